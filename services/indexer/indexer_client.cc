#include "services/indexer/indexer_client.h"

#include <chrono>
#include <cstring>

#include "common/replicas.h"
#include "common/spec_proto.h"
#include "common/status.h"

namespace fm::indexer {
namespace v1 = flashmemory::v1;
namespace {

void SetKeys(const ModelSpec& spec, const uint8_t* keys, uint64_t first, uint64_t chunks,
             v1::IndexKeys* out) {
  out->set_first_chunk(first);
  out->set_chunks(static_cast<uint32_t>(chunks));
  out->set_data(reinterpret_cast<const char*>(keys),
                size_t{spec.index_layers} * chunks * spec.IndexKeyBytes());
}

template <typename Req>
void AddBounds(const ModelSpec& spec, const float* bounds, uint64_t first, uint64_t pages, Req* r) {
  const size_t bf = IndexerBoundsFloats(spec);
  for (uint64_t i = 0; i < pages; ++i) {
    auto* b = r->add_bounds();
    b->set_page(first + i);
    b->set_min_max(reinterpret_cast<const char*>(bounds + i * bf), bf * 4);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<IndexerClient>> IndexerClient::Connect(
    const std::string& replicas, int deadline_ms, const ClientSecurity& security) {
  auto creds = MakeChannelCredentials(security.tls);
  if (!creds.ok()) return creds.status();
  auto names = ResolveReplicas(replicas);
  if (!names.ok()) return names.status();
  auto c = std::unique_ptr<IndexerClient>(new IndexerClient());
  c->names_ = *names;
  c->deadline_ms_ = deadline_ms;
  c->token_ = security.token;
  const grpc::ChannelArguments args = ClientChannelArgs(256 << 20);
  for (const auto& n : c->names_)
    c->stubs_.push_back(v1::Indexer::NewStub(
        grpc::CreateCustomChannel(n, *creds, args)));
  return c;
}

size_t IndexerClient::ReplicaFor(const std::string& session) const {
  return RendezvousPick(names_, session, kSessionKey);
}

std::unique_ptr<grpc::ClientContext> IndexerClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  AddBearerToken(ctx.get(), token_);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms_));
  return ctx;
}

absl::Status IndexerClient::Register(const std::string& session, const ModelSpec& spec,
                                     const uint8_t* keys, uint64_t chunks, uint64_t tokens,
                                     const float* bounds, uint64_t bound_pages) {
  v1::RegisterSessionRequest req;
  req.set_session_id(session);
  SpecToProto(spec, req.mutable_spec());
  SetKeys(spec, keys, 0, chunks, req.mutable_keys());
  AddBounds(spec, bounds, 0, bound_pages, &req);
  req.set_tokens(tokens);
  v1::RegisterSessionResponse resp;
  return FromGrpcStatus(Stub(session)->RegisterSession(Context().get(), req, &resp));
}

absl::Status IndexerClient::Append(const std::string& session, const ModelSpec& spec,
                                   const uint8_t* keys, uint64_t first_chunk, uint64_t chunks,
                                   uint64_t tokens, const float* bounds, uint64_t first_page,
                                   uint64_t bound_pages) {
  v1::AppendKeysRequest req;
  req.set_session_id(session);
  SetKeys(spec, keys, first_chunk, chunks, req.mutable_keys());
  AddBounds(spec, bounds, first_page, bound_pages, &req);
  req.set_tokens(tokens);
  v1::AppendKeysResponse resp;
  return FromGrpcStatus(Stub(session)->AppendKeys(Context().get(), req, &resp));
}

absl::StatusOr<Prediction> IndexerClient::Predict(const std::string& session,
                                                  const PredictArgs& a) {
  v1::PredictRequest req;
  req.set_session_id(session);
  req.set_step(a.step);
  req.set_hidden(reinterpret_cast<const char*>(a.hidden.data()), a.hidden.size() * 4);
  req.set_query(reinterpret_cast<const char*>(a.query.data()), a.query.size() * 4);
  req.set_budget(a.budget);
  req.set_max_pages(a.max_pages);
  req.set_policy(static_cast<v1::Policy>(a.policy));
  req.set_sink_pages(a.sink);
  req.set_tail_pages(a.tail);
  for (float m : a.oracle_page_mass) req.add_oracle_page_mass(m);
  req.set_history_pages(a.history_pages);
  v1::PredictResponse resp;
  if (absl::Status st = FromGrpcStatus(Stub(session)->Predict(Context().get(), req, &resp));
      !st.ok())
    return st;
  Prediction p;
  p.total_pages = resp.resident().total_pages();
  p.chunks_scored = resp.chunks_scored();
  p.latency_ms = resp.latency_ms();
  p.policy = a.policy;
  for (const auto& pg : resp.resident().pages()) p.pages.push_back({pg.page(), pg.score()});
  return p;
}

absl::Status IndexerClient::Drop(const std::string& session) {
  v1::DropSessionRequest req;
  req.set_session_id(session);
  v1::DropSessionResponse resp;
  return FromGrpcStatus(Stub(session)->DropSession(Context().get(), req, &resp));
}

absl::StatusOr<uint64_t> IndexerClient::LoadWeights(const std::string& path) {
  uint64_t hash = 0;
  for (auto& stub : stubs_) {
    v1::LoadWeightsRequest req;
    req.set_path(path);
    v1::LoadWeightsResponse resp;
    if (absl::Status st = FromGrpcStatus(stub->LoadWeights(Context().get(), req, &resp)); !st.ok())
      return st;
    hash = resp.weights_hash();
  }
  return hash;
}

absl::StatusOr<v1::IndexerStatsResponse> IndexerClient::Stats(size_t replica) {
  v1::IndexerStatsRequest req;
  v1::IndexerStatsResponse resp;
  if (absl::Status st = FromGrpcStatus(stubs_.at(replica)->GetStats(Context().get(), req, &resp));
      !st.ok())
    return st;
  return resp;
}

}  // namespace fm::indexer
