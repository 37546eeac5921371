#include "services/kvstore/kvstore_service.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/grpc_server.h"
#include "common/status.h"

namespace fm {
namespace v1 = flashmemory::v1;
namespace {

std::vector<PageRef> Refs(const google::protobuf::RepeatedPtrField<v1::PageKey>& keys) {
  std::vector<PageRef> refs;
  refs.reserve(keys.size());
  for (const auto& k : keys) refs.push_back(PageRef{k.session_id(), k.page()});
  return refs;
}

void LocationToProto(const LeasedLocation& l, v1::PageLocation* p) {
  p->mutable_key()->set_session_id(l.key.session_id);
  p->mutable_key()->set_page(l.key.page);
  p->set_remote_address(l.address);
  p->set_length(l.length);
}

}  // namespace

uint64_t NewInstanceId() {
  std::random_device rd;
  const uint64_t t = static_cast<uint64_t>(
      std::chrono::steady_clock::now().time_since_epoch().count());
  uint64_t id = (uint64_t{rd()} << 32 ^ rd()) ^ (t * 0x9E3779B97F4A7C15ull) ^ uint64_t(getpid());
  return id ? id : 1;
}

PageHeaderData HeaderFromProto(const v1::PageHeader& p) {
  PageHeaderData h;
  h.session_id = p.key().session_id();
  h.page = p.key().page();
  h.spec_hash = p.spec_hash();
  h.token_count = p.token_count();
  h.payload_bytes = p.payload_bytes();
  h.checksum = p.checksum();
  h.dtype = static_cast<DType>(p.dtype());
  return h;
}

void HeaderToProto(const PageHeaderData& h, v1::PageHeader* p) {
  p->mutable_key()->set_session_id(h.session_id);
  p->mutable_key()->set_page(h.page);
  p->set_spec_hash(h.spec_hash);
  p->set_token_count(h.token_count);
  p->set_payload_bytes(h.payload_bytes);
  p->set_checksum(h.checksum);
  p->set_dtype(static_cast<v1::DType>(h.dtype));
}

grpc::ServerUnaryReactor* KvStoreService::Connect(grpc::CallbackServerContext* ctx,
                                                  const v1::ConnectRequest* req,
                                                  v1::ConnectResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  UcxEndpointInfo info = store_->ucx();
  resp->set_worker_address(info.worker_address);
  resp->set_rkey(info.rkey);
  resp->set_arena_base(info.arena_base);
  resp->set_arena_bytes(info.arena_bytes);
  resp->set_instance_id(instance_id_);
  return FinishUnary(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::PutPage(grpc::CallbackServerContext* ctx,
                                                  const v1::PutPageRequest* req,
                                                  v1::PutPageResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  if (!req->has_header()) return FinishUnary(ctx, absl::InvalidArgumentError("header is missing"));
  bool in_ram = false;
  PageHeaderData h = HeaderFromProto(req->header());
  h.epoch = req->epoch();
  absl::Status s = store_->Put(h,
                               reinterpret_cast<const uint8_t*>(req->payload().data()),
                               req->payload().size(), &in_ram);
  resp->set_in_ram(in_ram);
  return FinishUnary(ctx, s);
}

namespace {

// Streams the requested pages, one message per page, reading each when the previous write
// completes (so at most one page is buffered per call).
class GetPagesReactor final : public grpc::ServerWriteReactor<v1::PageData> {
 public:
  GetPagesReactor(KvStore* store, std::vector<PageRef> keys, uint32_t max_keys,
                  const absl::Status& denied)
      : store_(store), keys_(std::move(keys)) {
    if (!denied.ok()) {
      Finish(ToGrpcStatus(denied));
      return;
    }
    if (keys_.empty()) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no pages requested"));
      return;
    }
    if (keys_.size() > max_keys) {
      Finish(
          grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                       absl::StrCat(keys_.size(), " pages in one call; the limit is ", max_keys)));
      return;
    }
    Next();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {
    if (next_ == keys_.size()) {
      Finish(grpc::Status::OK);
      return;
    }
    const PageRef& ref = keys_[next_++];
    msg_.Clear();
    bool from_spill = false;
    absl::Status s = store_->Read(
        ref,
        [&](const uint8_t* rec, size_t len) {
          PageHeaderData h;
          if (!DecodePageHeader(rec, &h).ok()) return;
          HeaderToProto(h, msg_.mutable_header());
          msg_.set_payload(rec + kPageHeaderBytes, len - kPageHeaderBytes);
        },
        &from_spill);
    if (s.ok() && !msg_.has_header()) s = absl::DataLossError("stored page header does not decode");
    if (!s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    msg_.set_from_spill(from_spill);
    StartWrite(&msg_);
  }

  KvStore* store_;
  std::vector<PageRef> keys_;
  size_t next_ = 0;
  v1::PageData msg_;
};

}  // namespace

grpc::ServerWriteReactor<v1::PageData>* KvStoreService::GetPages(grpc::CallbackServerContext* ctx,
                                                                 const v1::GetPagesRequest* req) {
  absl::Status who = Allow(*ctx);
  return new GetPagesReactor(store_, who.ok() ? Refs(req->keys()) : std::vector<PageRef>{},
                             max_keys_, who);
}

grpc::ServerUnaryReactor* KvStoreService::Resolve(grpc::CallbackServerContext* ctx,
                                                  const v1::ResolveRequest* req,
                                                  v1::ResolveResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  absl::StatusOr<Lease> lease = store_->Acquire(Refs(req->keys()), req->lease_ms(), ctx->peer());
  if (!lease.ok()) return FinishUnary(ctx, lease.status());
  resp->set_lease_id(lease->id);
  resp->set_instance_id(instance_id_);
  for (const auto& l : lease->locations) LocationToProto(l, resp->add_locations());
  return FinishUnary(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::GrantPut(grpc::CallbackServerContext* ctx,
                                                   const v1::GrantPutRequest* req,
                                                   v1::GrantPutResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  if (!req->has_header()) return FinishUnary(ctx, absl::InvalidArgumentError("header is missing"));
  PageHeaderData h = HeaderFromProto(req->header());
  h.epoch = req->epoch();
  absl::StatusOr<Lease> lease = store_->GrantPut(h, req->lease_ms(), ctx->peer());
  if (!lease.ok()) return FinishUnary(ctx, lease.status());
  resp->set_lease_id(lease->id);
  LocationToProto(lease->locations[0], resp->mutable_location());
  resp->set_instance_id(instance_id_);
  return FinishUnary(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::CommitPut(grpc::CallbackServerContext* ctx,
                                                    const v1::CommitPutRequest* req,
                                                    v1::CommitPutResponse*) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  return FinishUnary(ctx, store_->CommitPut(req->lease_id()));
}

grpc::ServerUnaryReactor* KvStoreService::Prefetch(grpc::CallbackServerContext* ctx,
                                                   const v1::PrefetchRequest* req,
                                                   v1::PrefetchResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  absl::StatusOr<Lease> lease = store_->Acquire(Refs(req->keys()), req->lease_ms(), ctx->peer());
  if (!lease.ok()) return FinishUnary(ctx, lease.status());
  resp->set_lease_id(lease->id);
  resp->set_promoted(lease->promoted);
  resp->set_pinned(lease->locations.size());
  return FinishUnary(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::Release(grpc::CallbackServerContext* ctx,
                                                  const v1::ReleaseRequest* req,
                                                  v1::ReleaseResponse*) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  return FinishUnary(ctx, store_->Release(req->lease_id()));
}

grpc::ServerUnaryReactor* KvStoreService::DeleteSession(grpc::CallbackServerContext* ctx,
                                                        const v1::DeleteSessionRequest* req,
                                                        v1::DeleteSessionResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  absl::StatusOr<uint64_t> n = store_->DeleteSession(req->session_id(), req->epoch());
  if (n.ok()) resp->set_pages_deleted(*n);
  return FinishUnary(ctx, n.status());
}

grpc::ServerUnaryReactor* KvStoreService::CloseSession(grpc::CallbackServerContext* ctx,
                                                       const v1::KvCloseSessionRequest* req,
                                                       v1::KvCloseSessionResponse*) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  return FinishUnary(ctx, store_->CloseSession(req->session_id(), req->epoch()));
}

grpc::ServerUnaryReactor* KvStoreService::ClaimSession(grpc::CallbackServerContext* ctx,
                                                       const v1::ClaimSessionRequest* req,
                                                       v1::ClaimSessionResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  absl::StatusOr<uint64_t> e = store_->ClaimSession(req->session_id(), req->min_epoch());
  if (e.ok()) resp->set_epoch(*e);
  return FinishUnary(ctx, e.status());
}

grpc::ServerUnaryReactor* KvStoreService::GetStats(grpc::CallbackServerContext* ctx,
                                                   const v1::GetStatsRequest* req,
                                                   v1::GetStatsResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  absl::StatusOr<KvStats> st = store_->Stats(req->session_id());
  if (!st.ok()) return FinishUnary(ctx, st.status());
  resp->mutable_ram()->set_bytes(st->ram_bytes);
  resp->mutable_ram()->set_pages(st->ram_pages);
  resp->mutable_ram()->set_capacity_bytes(st->ram_capacity);
  resp->mutable_rocksdb()->set_bytes(st->disk_bytes);
  resp->mutable_rocksdb()->set_pages(st->disk_pages);
  resp->set_hits(st->hits);
  resp->set_misses(st->misses);
  resp->set_evictions(st->evictions);
  resp->set_spill_reads(st->spill_reads);
  resp->set_pinned_pages(st->pinned_pages);
  resp->set_active_leases(st->active_leases);
  for (const auto& s : st->sessions) {
    auto* p = resp->add_sessions();
    p->set_session_id(s.session_id);
    p->set_pages(s.pages);
    p->set_bytes(s.bytes);
    p->set_ram_pages(s.ram_pages);
    p->set_hits(s.hits);
    p->set_misses(s.misses);
  }
  return FinishUnary(ctx, absl::OkStatus());
}

}  // namespace fm
