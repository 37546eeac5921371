#include "services/kvstore/ucx_transport.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace fm {
namespace {

absl::Status UcxError(const char* what, ucs_status_t s) {
  return absl::UnavailableError(absl::StrCat("ucx: ", what, ": ", ucs_status_string(s)));
}

}  // namespace

UcxRegion::~UcxRegion() {
  if (memh_) ucp_mem_unmap(context_, memh_);
}

absl::StatusOr<std::unique_ptr<UcxEngine>> UcxEngine::Create(bool progress_thread) {
  std::unique_ptr<UcxEngine> e(new UcxEngine());
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return UcxError("config_read", s);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 1;
  s = ucp_init(&params, config, &e->context_);
  ucp_config_release(config);
  if (s != UCS_OK) return UcxError("init", s);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // every use holds worker_mu_
  s = ucp_worker_create(e->context_, &wp, &e->worker_);
  if (s != UCS_OK) return UcxError("worker_create", s);

  ucp_address_t* addr = nullptr;
  size_t len = 0;
  s = ucp_worker_get_address(e->worker_, &addr, &len);
  if (s != UCS_OK) return UcxError("worker_get_address", s);
  e->address_.assign(reinterpret_cast<const char*>(addr), len);
  ucp_worker_release_address(e->worker_, addr);

  if (progress_thread) {
    s = ucp_worker_get_efd(e->worker_, &e->efd_);
    if (s != UCS_OK) return UcxError("worker_get_efd", s);
    e->progress_ = std::thread([p = e.get()] { p->ProgressLoop(); });
  }
  return e;
}

UcxEngine::~UcxEngine() {
  stop_.store(true);
  if (progress_.joinable()) {
    ucp_worker_signal(worker_);
    progress_.join();
  }
  if (worker_) ucp_worker_destroy(worker_);
  if (context_) ucp_cleanup(context_);
}

void UcxEngine::ProgressLoop() {
  int ep = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  epoll_ctl(ep, EPOLL_CTL_ADD, efd_, &ev);
  while (!stop_.load()) {
    ucs_status_t armed;
    {
      std::lock_guard<std::mutex> lock(worker_mu_);
      while (ucp_worker_progress(worker_) != 0) {
      }
      armed = ucp_worker_arm(worker_);
    }
    if (armed == UCS_ERR_BUSY) continue;
    epoll_event out;
    epoll_wait(ep, &out, 1, 50);
  }
  close(ep);
}

absl::StatusOr<std::unique_ptr<UcxRegion>> UcxEngine::MapRegion(size_t bytes) {
  std::unique_ptr<UcxRegion> r(new UcxRegion());
  r->context_ = context_;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                  UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  mp.address = nullptr;
  mp.length = bytes;
  mp.flags = UCP_MEM_MAP_ALLOCATE;
  ucs_status_t s = ucp_mem_map(context_, &mp, &r->memh_);
  if (s != UCS_OK) return UcxError("mem_map", s);
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  s = ucp_mem_query(r->memh_, &attr);
  if (s != UCS_OK) return UcxError("mem_query", s);
  r->data_ = static_cast<uint8_t*>(attr.address);
  r->size_ = bytes;
  void* rkey = nullptr;
  size_t rkey_len = 0;
  s = ucp_rkey_pack(context_, r->memh_, &rkey, &rkey_len);
  if (s != UCS_OK) return UcxError("rkey_pack", s);
  r->rkey_.assign(static_cast<const char*>(rkey), rkey_len);
  ucp_rkey_buffer_release(rkey);
  return r;
}

absl::StatusOr<std::unique_ptr<UcxPeer>> UcxPeer::Connect(UcxEngine* engine,
                                                          const std::string& remote_address,
                                                          const std::string& packed_rkey) {
  if (remote_address.empty()) return absl::FailedPreconditionError("ucx: server has UCX disabled");
  std::unique_ptr<UcxPeer> p(new UcxPeer());
  p->engine_ = engine;
  std::lock_guard<std::mutex> lock(engine->worker_mutex());
  ucp_ep_params_t ep{};
  // No peer-failure error mode: it would exclude the shared-memory transports (posix, sysv,
  // cma) that make same-host gets run at memory speed. A dead peer is caught by the
  // deadline in Run() instead.
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.address = reinterpret_cast<const ucp_address_t*>(remote_address.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  ucs_status_t s = ucp_ep_create(engine->worker(), &ep, &p->ep_);
  if (s != UCS_OK) return UcxError("ep_create", s);
  s = ucp_ep_rkey_unpack(p->ep_, packed_rkey.data(), &p->rkey_);
  if (s != UCS_OK) return UcxError("rkey_unpack", s);
  return p;
}

UcxPeer::~UcxPeer() {
  std::lock_guard<std::mutex> lock(engine_->worker_mutex());
  if (rkey_) ucp_rkey_destroy(rkey_);
  if (ep_) {
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t req = ucp_ep_close_nbx(ep_, &rp);
    if (UCS_PTR_IS_PTR(req)) {
      while (ucp_request_check_status(req) == UCS_INPROGRESS)
        ucp_worker_progress(engine_->worker());
      ucp_request_free(req);
    }
  }
}

absl::Status UcxPeer::Get(const std::vector<Op>& ops, const UcxRegion& local, int timeout_ms) {
  return Run(true, ops, local, timeout_ms);
}
absl::Status UcxPeer::Put(const std::vector<Op>& ops, const UcxRegion& local, int timeout_ms) {
  return Run(false, ops, local, timeout_ms);
}

absl::Status UcxPeer::Run(bool is_get, const std::vector<Op>& ops, const UcxRegion& local,
                          int timeout_ms) {
  if (broken_) return absl::UnavailableError("ucx: peer connection is broken");
  std::lock_guard<std::mutex> lock(engine_->worker_mutex());
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
  rp.memh = local.memh();
  std::vector<ucs_status_ptr_t> reqs;
  reqs.reserve(ops.size() + 1);
  absl::Status result;
  for (const Op& op : ops) {
    ucs_status_ptr_t r = is_get
                             ? ucp_get_nbx(ep_, op.local, op.length, op.remote_address, rkey_, &rp)
                             : ucp_put_nbx(ep_, op.local, op.length, op.remote_address, rkey_, &rp);
    if (UCS_PTR_IS_ERR(r)) {
      result = UcxError(is_get ? "get" : "put", UCS_PTR_STATUS(r));
      break;
    }
    if (r != nullptr) reqs.push_back(r);
  }
  if (!is_get && result.ok()) {  // a put is complete at the target only after a flush
    ucp_request_param_t fp{};
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep_, &fp);
    if (UCS_PTR_IS_ERR(r))
      result = UcxError("flush", UCS_PTR_STATUS(r));
    else if (r != nullptr)
      reqs.push_back(r);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ucs_status_ptr_t r = reqs[i];
    ucs_status_t st;
    while ((st = ucp_request_check_status(r)) == UCS_INPROGRESS) {
      ucp_worker_progress(engine_->worker());
      if (std::chrono::steady_clock::now() > deadline && !broken_) {
        broken_ = true;  // force-close completes every outstanding request with an error
        result = absl::UnavailableError("ucx: operation timed out");
        ucp_rkey_destroy(rkey_);
        rkey_ = nullptr;
        ucp_request_param_t cp{};
        cp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
        cp.flags = UCP_EP_CLOSE_FLAG_FORCE;
        ucs_status_ptr_t c = ucp_ep_close_nbx(ep_, &cp);
        ep_ = nullptr;
        if (UCS_PTR_IS_PTR(c)) reqs.push_back(c);
      }
    }
    if (st != UCS_OK && result.ok()) result = UcxError(is_get ? "get" : "put", st);
    ucp_request_free(r);
  }
  if (!result.ok() && !broken_ && result.code() == absl::StatusCode::kUnavailable) broken_ = true;
  return result;
}

}  // namespace fm
