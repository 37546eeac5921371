#include "services/kvstore/kv_client.h"

#include <arpa/inet.h>
#include <netdb.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/checksum.h"
#include "common/log.h"
#include "common/status.h"
#include "services/kvstore/kvstore_service.h"

namespace fm {
namespace v1 = flashmemory::v1;

namespace {

template <typename Request>
void AddKeys(const std::vector<PageRef>& keys, Request* req) {
  for (const auto& k : keys) {
    auto* p = req->add_keys();
    p->set_session_id(k.session_id);
    p->set_page(k.page);
  }
}

}  // namespace

struct UcxLink {
  std::unique_ptr<UcxPeer> peer;
  uint64_t instance = 0, base = 0, bytes = 0;
  bool Contains(uint64_t address, uint64_t length) const {
    return address >= base && length <= bytes && address - base <= bytes - length;
  }
};

absl::StatusOr<std::unique_ptr<KvClient>> KvClient::Connect(const std::string& target,
                                                            const KvClientOptions& options,
                                                            UcxEngine* engine) {
  std::unique_ptr<KvClient> c(new KvClient());
  c->target_ = target;
  c->options_ = options;
  grpc::ChannelArguments args = ClientChannelArgs(options.max_message_bytes);
  auto creds = MakeChannelCredentials(options.security.tls);
  if (!creds.ok()) return creds.status();
  c->channel_ = grpc::CreateCustomChannel(target, *creds, args);
  c->stub_ = v1::KvStore::NewStub(c->channel_);

  if (options.use_ucx) {
    if (engine == nullptr) {
      FM_ASSIGN_OR_RETURN(c->own_engine_, UcxEngine::Create(/*progress_thread=*/false));
      engine = c->own_engine_.get();
    }
    c->engine_ = engine;
    absl::StatusOr<std::shared_ptr<UcxLink>> link = c->Dial();
    if (link.ok()) {
      c->ucx_offered_ = true;
      c->link_ = std::move(*link);
      FM_ASSIGN_OR_RETURN(c->staging_, engine->MapRegion(options.staging_bytes));
    } else if (!absl::IsFailedPrecondition(link.status())) {
      return link.status();
    }
  }
  return c;
}

absl::StatusOr<std::shared_ptr<UcxLink>> KvClient::Dial() {
  v1::ConnectRequest req;
  req.set_worker_address(engine_->worker_address());
  v1::ConnectResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->Connect(ctx.get(), req, &resp)));
  if (resp.worker_address().empty())
    return absl::FailedPreconditionError(absl::StrCat("the kvstore at ", target_,
                                                      " offers no UCX data path"));
  auto link = std::make_shared<UcxLink>();
  FM_ASSIGN_OR_RETURN(link->peer, UcxPeer::Connect(engine_, resp.worker_address(), resp.rkey()));
  link->instance = resp.instance_id();
  link->base = resp.arena_base();
  link->bytes = resp.arena_bytes();
  return link;
}

absl::StatusOr<std::shared_ptr<UcxLink>> KvClient::LinkFor(uint64_t instance) {
  std::lock_guard<std::mutex> l(link_mu_);
  if (link_ && !link_->peer->broken() && link_->instance == instance) return link_;
  const bool restarted = link_ && link_->instance != instance;
  link_.reset();  // a reader still holding the old link keeps it until it finishes
  FM_ASSIGN_OR_RETURN(std::shared_ptr<UcxLink> link, Dial());
  ++reconnects_;
  FM_LOG_INFO("kvstore client: UCX link to %s made again (%s)", target_.c_str(),
              restarted ? "the server restarted" : "the previous link failed");
  link_ = link;
  return link;
}

void KvClient::DropLink(const std::shared_ptr<UcxLink>& link) {
  std::lock_guard<std::mutex> l(link_mu_);
  if (link_ == link) link_.reset();
}

KvClient::~KvClient() {
  {
    std::unique_lock<std::mutex> l(release_mu_);
    release_cv_.wait(l, [this] { return releases_ == 0; });  // each within its deadline
  }
  staging_.reset();
  link_.reset();
}

std::unique_ptr<grpc::ClientContext> KvClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  AddBearerToken(ctx.get(), options_.security.token);
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(options_.deadline_ms));
  return ctx;
}

absl::Status KvClient::Put(const PageHeaderData& header, const void* payload, bool* in_ram) {
  v1::PutPageRequest req;
  HeaderToProto(header, req.mutable_header());
  req.set_epoch(header.epoch);
  req.set_payload(payload, header.payload_bytes);
  v1::PutPageResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->PutPage(ctx.get(), req, &resp)));
  if (in_ram) *in_ram = resp.in_ram();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PageRecord>> KvClient::Get(const std::vector<PageRef>& keys) {
  v1::GetPagesRequest req;
  AddKeys(keys, &req);
  auto ctx = Context();
  auto reader = stub_->GetPages(ctx.get(), req);
  std::vector<PageRecord> out;
  out.reserve(keys.size());
  v1::PageData msg;
  while (reader->Read(&msg)) {
    if (out.size() >= keys.size())
      return absl::DataLossError("server sent more pages than requested");
    const PageRef& want = keys[out.size()];
    PageRecord rec;
    rec.header = HeaderFromProto(msg.header());
    if (rec.header.session_id != want.session_id || rec.header.page != want.page)
      return absl::DataLossError(absl::StrCat("got page ", rec.header.page, " of \"",
                                              rec.header.session_id, "\", asked for page ",
                                              want.page, " of \"", want.session_id, "\""));
    if (msg.payload().size() != rec.header.payload_bytes ||
        Checksum64(msg.payload().data(), msg.payload().size()) != rec.header.checksum)
      return absl::DataLossError(
          absl::StrCat("page ", want.page, " of \"", want.session_id, "\": checksum mismatch"));
    rec.payload = std::move(*msg.mutable_payload());
    out.push_back(std::move(rec));
  }
  FM_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  if (out.size() != keys.size()) return absl::DataLossError("server ended the stream early");
  return out;
}

absl::StatusOr<KvClient::Resolved> KvClient::Resolve(const std::vector<PageRef>& keys) {
  if (!ucx_offered_) return absl::FailedPreconditionError("no UCX connection to " + target_);
  v1::ResolveRequest req;
  AddKeys(keys, &req);
  req.set_lease_ms(options_.lease_ms);
  v1::ResolveResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->Resolve(ctx.get(), req, &resp)));
  if (resp.locations_size() != static_cast<int>(keys.size())) {
    ReleaseAsync(resp.lease_id());
    return absl::DataLossError("server resolved a different number of pages than asked");
  }
  Resolved r;
  r.lease_id = resp.lease_id();
  absl::StatusOr<std::shared_ptr<UcxLink>> link = LinkFor(resp.instance_id());
  if (!link.ok()) {
    ReleaseAsync(resp.lease_id());
    return link.status();
  }
  if ((*link)->instance != resp.instance_id()) {  // it restarted again in between
    ReleaseAsync(resp.lease_id());
    return absl::UnavailableError(
        absl::StrCat("the kvstore at ", target_, " restarted while resolving; retry"));
  }
  r.link = std::move(*link);
  r.keys = keys;
  for (const auto& loc : resp.locations()) {
    if (!r.link->Contains(loc.remote_address(), loc.length())) {
      ReleaseAsync(resp.lease_id());
      return absl::DataLossError(absl::StrCat("the kvstore at ", target_, " resolved page ",
                                              loc.key().page(), " outside its arena"));
    }
    r.addresses.push_back(loc.remote_address());
    r.lengths.push_back(loc.length());
  }
  return r;
}

absl::Status KvClient::ReadUcx(const std::vector<PageRef>& keys, const UcxRegion& dst,
                               const std::vector<uint64_t>& dst_offsets,
                               std::vector<PageHeaderData>* headers) {
  if (dst_offsets.size() != keys.size())
    return absl::InvalidArgumentError("one destination offset per key");
  absl::StatusOr<Resolved> r = Resolve(keys);
  if (absl::IsResourceExhausted(r.status()) && keys.size() > 1) {
    // Over this client's share of the store's pinned bytes: two smaller leases.
    const size_t half = keys.size() / 2;
    std::vector<PageHeaderData> h[2];
    for (int i = 0; i < 2; ++i) {
      const size_t a = i ? half : 0, b = i ? keys.size() : half;
      FM_RETURN_IF_ERROR(ReadUcx({keys.begin() + a, keys.begin() + b},
                                 dst, {dst_offsets.begin() + a, dst_offsets.begin() + b},
                                 headers ? &h[i] : nullptr));
    }
    if (headers) {
      *headers = std::move(h[0]);
      headers->insert(headers->end(), h[1].begin(), h[1].end());
    }
    return absl::OkStatus();
  }
  if (!r.ok()) return r.status();
  return ReadResolved(*r, dst, dst_offsets, headers);
}

absl::Status KvClient::ReadResolved(const Resolved& r, const UcxRegion& dst,
                                    const std::vector<uint64_t>& dst_offsets,
                                    std::vector<PageHeaderData>* headers) {
  absl::Status s;
  if (dst_offsets.size() != r.keys.size())
    s = absl::InvalidArgumentError("one destination offset per key");
  if (!r.link) s = absl::FailedPreconditionError("the locations come from no Resolve");
  std::vector<UcxPeer::Op> ops;
  ops.reserve(r.keys.size());
  for (size_t i = 0; i < r.keys.size() && s.ok(); ++i) {
    if (dst_offsets[i] + r.lengths[i] > dst.size())
      s = absl::InvalidArgumentError("destination buffer too small for the page records");
    ops.push_back(UcxPeer::Op{r.addresses[i], dst.data() + dst_offsets[i], r.lengths[i]});
  }
  if (headers) headers->resize(r.keys.size());
  // Get and verify in groups of about kVerifyGroupBytes, so the checksum reads bytes that are
  // still in cache rather than making a second pass over memory.
  constexpr uint64_t kVerifyGroupBytes = 2ull << 20;
  for (size_t i = 0; i < ops.size() && s.ok();) {
    size_t j = i;
    uint64_t bytes = 0;
    while (j < ops.size() && (j == i || bytes + ops[j].length <= kVerifyGroupBytes))
      bytes += ops[j++].length;
    s = r.link->peer->Get(std::vector<UcxPeer::Op>(ops.begin() + i, ops.begin() + j), dst,
                          options_.deadline_ms);
    if (!s.ok() && r.link->peer->broken()) DropLink(r.link);
    for (; i < j && s.ok(); ++i)
      s = VerifyPageRecord(ops[i].local, ops[i].length, r.keys[i].session_id, r.keys[i].page,
                           headers ? &(*headers)[i] : nullptr);
  }
  // The lease can end as soon as the bytes are here; release it off the critical path.
  ReleaseAsync(r.lease_id);
  return s;
}

void KvClient::ReleaseAsync(uint64_t lease_id) {
  struct Call {
    grpc::ClientContext ctx;
    v1::ReleaseRequest req;
    v1::ReleaseResponse resp;
  };
  auto* call = new Call();
  AddBearerToken(&call->ctx, options_.security.token);
  call->ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(options_.deadline_ms));
  call->req.set_lease_id(lease_id);
  {
    std::lock_guard<std::mutex> l(release_mu_);
    ++releases_;
  }
  // A failed release is harmless: the lease expires on its own.
  stub_->async()->Release(&call->ctx, &call->req, &call->resp, [this, call](grpc::Status) {
    delete call;
    std::lock_guard<std::mutex> l(release_mu_);
    --releases_;
    release_cv_.notify_all();
  });
}

absl::Status KvClient::PutUcx(const PageHeaderData& header, const void* payload) {
  if (!ucx_offered_) return absl::FailedPreconditionError("no UCX connection to " + target_);
  uint64_t len = kPageHeaderBytes + header.payload_bytes;
  std::lock_guard<std::mutex> lock(staging_mu_);
  if (len > staging_->size())
    return absl::ResourceExhaustedError("page larger than the staging buffer");
  v1::GrantPutRequest req;
  HeaderToProto(header, req.mutable_header());
  req.set_epoch(header.epoch);
  req.set_lease_ms(options_.lease_ms);
  v1::GrantPutResponse resp;
  {
    auto ctx = Context();
    FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->GrantPut(ctx.get(), req, &resp)));
  }
  FM_ASSIGN_OR_RETURN(std::shared_ptr<UcxLink> link, LinkFor(resp.instance_id()));
  if (link->instance != resp.instance_id())
    return absl::UnavailableError(
        absl::StrCat("the kvstore at ", target_, " restarted while granting a put; retry"));
  if (!link->Contains(resp.location().remote_address(), len))
    return absl::DataLossError(
        absl::StrCat("the kvstore at ", target_, " granted a put outside its arena"));
  EncodePageHeader(header, staging_->data());
  std::memcpy(staging_->data() + kPageHeaderBytes, payload, header.payload_bytes);
  absl::Status put = link->peer->Put(
      {UcxPeer::Op{resp.location().remote_address(), staging_->data(), len}}, *staging_,
      options_.deadline_ms);
  if (!put.ok()) {
    if (link->peer->broken()) DropLink(link);
    return put;
  }
  v1::CommitPutRequest commit;
  commit.set_lease_id(resp.lease_id());
  v1::CommitPutResponse commit_resp;
  auto ctx = Context();
  return FromGrpcStatus(stub_->CommitPut(ctx.get(), commit, &commit_resp));
}

absl::StatusOr<std::vector<PageRecord>> KvClient::Read(const std::vector<PageRef>& keys) {
  if (!ucx_offered_) return Get(keys);
  std::vector<PageRecord> out;
  out.reserve(keys.size());
  std::lock_guard<std::mutex> lock(staging_mu_);
  // Batches sized to the staging buffer; the record size is learned from the first batch.
  size_t i = 0;
  uint64_t record = 0;
  size_t most = SIZE_MAX;  // halved while the store refuses a lease this large
  while (i < keys.size()) {
    size_t n = record == 0 ? 1 : std::max<uint64_t>(1, staging_->size() / record);
    n = std::min({n, most, keys.size() - i});
    absl::StatusOr<Resolved> resolved =
        Resolve(std::vector<PageRef>(keys.begin() + i, keys.begin() + i + n));
    if (absl::IsResourceExhausted(resolved.status()) && n > 1) {
      most = n / 2;  // over this client's share of pinned bytes: smaller leases
      continue;
    }
    FM_ASSIGN_OR_RETURN(Resolved r, std::move(resolved));
    std::vector<uint64_t> offsets;
    uint64_t off = 0;
    for (uint64_t len : r.lengths) {
      offsets.push_back(off);
      off += len;
      record = std::max(record, len);
    }
    if (off > staging_->size()) {
      // Pages larger than expected: read what fits, the rest in the next batch.
      while (!r.keys.empty() && offsets.back() + r.lengths.back() > staging_->size()) {
        r.keys.pop_back();
        r.lengths.pop_back();
        r.addresses.pop_back();
        offsets.pop_back();
      }
      if (r.keys.empty()) {
        ReleaseAsync(r.lease_id);
        return absl::ResourceExhaustedError("page larger than the staging buffer");
      }
    }
    std::vector<PageHeaderData> headers;
    FM_RETURN_IF_ERROR(ReadResolved(r, *staging_, offsets, &headers));
    for (size_t j = 0; j < r.keys.size(); ++j) {
      PageRecord rec;
      rec.header = std::move(headers[j]);
      rec.payload.assign(
          reinterpret_cast<const char*>(staging_->data() + offsets[j] + kPageHeaderBytes),
          rec.header.payload_bytes);
      out.push_back(std::move(rec));
    }
    i += r.keys.size();
  }
  return out;
}

absl::StatusOr<v1::PrefetchResponse> KvClient::Prefetch(const std::vector<PageRef>& keys,
                                                        uint32_t lease_ms) {
  v1::PrefetchRequest req;
  AddKeys(keys, &req);
  req.set_lease_ms(lease_ms);
  v1::PrefetchResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->Prefetch(ctx.get(), req, &resp)));
  return resp;
}

absl::Status KvClient::Release(uint64_t lease_id) {
  v1::ReleaseRequest req;
  req.set_lease_id(lease_id);
  v1::ReleaseResponse resp;
  auto ctx = Context();
  return FromGrpcStatus(stub_->Release(ctx.get(), req, &resp));
}

absl::StatusOr<uint64_t> KvClient::DeleteSession(const std::string& session_id, uint64_t epoch) {
  v1::DeleteSessionRequest req;
  req.set_session_id(session_id);
  req.set_epoch(epoch);
  v1::DeleteSessionResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->DeleteSession(ctx.get(), req, &resp)));
  return resp.pages_deleted();
}

absl::StatusOr<uint64_t> KvClient::ClaimSession(const std::string& session_id,
                                                uint64_t min_epoch) {
  v1::ClaimSessionRequest req;
  req.set_session_id(session_id);
  req.set_min_epoch(min_epoch);
  v1::ClaimSessionResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->ClaimSession(ctx.get(), req, &resp)));
  return resp.epoch();
}

absl::Status KvClient::CloseSession(const std::string& session_id, uint64_t epoch) {
  v1::KvCloseSessionRequest req;
  req.set_session_id(session_id);
  req.set_epoch(epoch);
  v1::KvCloseSessionResponse resp;
  auto ctx = Context();
  return FromGrpcStatus(stub_->CloseSession(ctx.get(), req, &resp));
}

absl::StatusOr<v1::GetStatsResponse> KvClient::Stats(const std::string& session) {
  v1::GetStatsRequest req;
  req.set_session_id(session);
  v1::GetStatsResponse resp;
  auto ctx = Context();
  FM_RETURN_IF_ERROR(FromGrpcStatus(stub_->GetStats(ctx.get(), req, &resp)));
  return resp;
}

absl::StatusOr<std::unique_ptr<ShardedKvClient>> ShardedKvClient::Connect(
    const std::vector<std::string>& replicas, const KvClientOptions& options) {
  if (replicas.empty()) return absl::InvalidArgumentError("empty replica list");
  auto c = std::make_unique<ShardedKvClient>();
  c->names_ = replicas;
  if (options.use_ucx) {
    FM_ASSIGN_OR_RETURN(c->engine_, UcxEngine::Create(false));
  }
  for (const auto& r : replicas) {
    FM_ASSIGN_OR_RETURN(auto client, KvClient::Connect(r, options, c->engine_.get()));
    c->clients_.push_back(std::move(client));
  }
  return c;
}

size_t ShardedKvClient::ReplicaFor(const std::string& session_id, uint64_t page) const {
  return RendezvousPick(names_, session_id, page);
}

absl::Status ShardedKvClient::Put(const PageHeaderData& header, const void* payload) {
  return clients_[ReplicaFor(header.session_id, header.page)]->Put(header, payload);
}

std::map<size_t, std::vector<size_t>> ShardedKvClient::ByReplica(
    const std::vector<PageRef>& keys) const {
  std::map<size_t, std::vector<size_t>> by_replica;
  for (size_t i = 0; i < keys.size(); ++i)
    by_replica[ReplicaFor(keys[i].session_id, keys[i].page)].push_back(i);
  return by_replica;
}

absl::StatusOr<std::vector<PageRecord>> ShardedKvClient::Read(const std::vector<PageRef>& keys) {
  std::vector<PageRecord> out(keys.size());
  for (auto& [r, idx] : ByReplica(keys)) {
    std::vector<PageRef> sub;
    for (size_t i : idx) sub.push_back(keys[i]);
    FM_ASSIGN_OR_RETURN(auto recs, clients_[r]->Read(sub));
    for (size_t j = 0; j < idx.size(); ++j) out[idx[j]] = std::move(recs[j]);
  }
  return out;
}

absl::Status ShardedKvClient::ReadInto(const std::vector<PageRef>& keys, const UcxRegion& dst,
                                       const std::vector<uint64_t>& offsets, uint64_t room,
                                       std::vector<PageHeaderData>* headers) {
  if (offsets.size() != keys.size())
    return absl::InvalidArgumentError("one destination offset per key");
  for (uint64_t off : offsets)
    if (off + room > dst.size())
      return absl::InvalidArgumentError("destination offset beyond the region");
  if (headers) headers->assign(keys.size(), PageHeaderData{});
  auto too_large = [&](const PageRef& k, uint64_t len) {
    return absl::DataLossError(absl::StrCat("page ", k.page, " of \"", k.session_id,
                                            "\": a record of ", len,
                                            " bytes does not fit its destination of ", room));
  };
  for (auto& [r, idx] : ByReplica(keys)) {
    KvClient* c = clients_[r].get();
    std::vector<PageRef> sub;
    std::vector<uint64_t> off;
    for (size_t i : idx) {
      sub.push_back(keys[i]);
      off.push_back(offsets[i]);
    }
    std::vector<PageHeaderData> h;
    if (c->has_ucx()) {
      absl::StatusOr<KvClient::Resolved> resolved = c->Resolve(sub);
      if (absl::IsResourceExhausted(resolved.status()) && sub.size() > 1) {
        // Over this client's share of the store's pinned bytes: two smaller leases.
        const size_t half = idx.size() / 2;
        for (auto [a, b] : {std::pair<size_t, size_t>{0, half}, {half, idx.size()}}) {
          std::vector<PageRef> k(sub.begin() + a, sub.begin() + b);
          std::vector<uint64_t> o(off.begin() + a, off.begin() + b);
          std::vector<PageHeaderData> hh;
          FM_RETURN_IF_ERROR(ReadInto(k, dst, o, room, headers ? &hh : nullptr));
          if (headers)
            for (size_t j = a; j < b; ++j) (*headers)[idx[j]] = std::move(hh[j - a]);
        }
        continue;
      }
      FM_ASSIGN_OR_RETURN(KvClient::Resolved res, std::move(resolved));
      for (size_t j = 0; j < sub.size(); ++j)
        if (res.lengths[j] > room) {
          (void)c->Release(res.lease_id);
          return too_large(sub[j], res.lengths[j]);
        }
      FM_RETURN_IF_ERROR(c->ReadResolved(res, dst, off, &h));
    } else {
      FM_ASSIGN_OR_RETURN(auto recs, c->Get(sub));  // verified
      for (size_t j = 0; j < sub.size(); ++j) {
        const uint64_t len = kPageHeaderBytes + recs[j].payload.size();
        if (len > room) return too_large(sub[j], len);
        EncodePageHeader(recs[j].header, dst.data() + off[j]);
        std::memcpy(dst.data() + off[j] + kPageHeaderBytes, recs[j].payload.data(),
                    recs[j].payload.size());
        h.push_back(std::move(recs[j].header));
      }
    }
    if (headers)
      for (size_t j = 0; j < idx.size(); ++j) (*headers)[idx[j]] = std::move(h[j]);
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ShardedKvClient::DeleteSession(const std::string& session_id,
                                                       uint64_t epoch) {
  uint64_t total = 0;
  bool found = false;
  for (auto& c : clients_) {
    absl::StatusOr<uint64_t> n = c->DeleteSession(session_id, epoch);
    if (n.ok()) {
      found = true;
      total += *n;
    } else if (n.status().code() != absl::StatusCode::kNotFound) {
      return n.status();
    }
  }
  if (!found) return absl::NotFoundError(absl::StrCat("unknown session \"", session_id, "\""));
  return total;
}

absl::StatusOr<uint64_t> ShardedKvClient::ClaimSession(const std::string& session_id) {
  // Each replica's epoch becomes max(its own + 1, e). The first pass raises each by one; the
  // highest answer is the claim, and the replicas below it are raised to it. A replica that
  // answers above (a claim elsewhere got ahead there) raises the target again.
  std::vector<uint64_t> at(clients_.size(), 0);
  uint64_t e = 0;
  for (size_t i = 0; i < clients_.size(); ++i) {
    FM_ASSIGN_OR_RETURN(at[i], clients_[i]->ClaimSession(session_id, 0));
    e = std::max(e, at[i]);
  }
  for (int round = 0; round < 8; ++round) {
    bool agreed = true;
    for (size_t i = 0; i < clients_.size(); ++i) {
      if (at[i] >= e) continue;
      FM_ASSIGN_OR_RETURN(at[i], clients_[i]->ClaimSession(session_id, e));
      if (at[i] > e) e = at[i];
    }
    for (uint64_t v : at) agreed = agreed && v == e;
    if (agreed) return e;
  }
  return absl::AbortedError(absl::StrCat("session \"", session_id,
                                         "\" is being claimed by another worker; retry"));
}

absl::Status ShardedKvClient::CloseSession(const std::string& session_id, uint64_t epoch) {
  bool found = false;
  for (auto& c : clients_) {
    absl::Status st = c->CloseSession(session_id, epoch);
    if (st.ok()) {
      found = true;
    } else if (!absl::IsNotFound(st)) {
      return st;
    }
  }
  if (!found) return absl::NotFoundError(absl::StrCat("unknown session \"", session_id, "\""));
  return absl::OkStatus();
}

}  // namespace fm
