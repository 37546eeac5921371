#include "services/indexer/indexer_service.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "common/spec_proto.h"
#include "common/status.h"

namespace fm::indexer {
namespace v1 = flashmemory::v1;
namespace {

absl::StatusOr<std::vector<float>> Floats(const std::string& bytes, const char* what) {
  if (bytes.size() % 4 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", bytes.size(), " bytes, not a whole number of fp32 values"));
  std::vector<float> v(bytes.size() / 4);
  if (!v.empty()) std::memcpy(v.data(), bytes.data(), bytes.size());  // (no memcpy of null)
  return v;
}

// Keys of a request as [index_layer][chunk][di + 4] bytes, checked against the spec.
absl::Status CheckKeys(const ModelSpec& spec, const v1::IndexKeys& k) {
  const uint64_t want = uint64_t{spec.index_layers} * k.chunks() * spec.IndexKeyBytes();
  if (k.data().size() != want)
    return absl::InvalidArgumentError(absl::StrCat(
        "index keys carry ", k.data().size(), " bytes; expected [", spec.index_layers, "][",
        k.chunks(), "][", spec.IndexKeyBytes(), "] = ", want, " (index_dim + 4 per key)"));
  return absl::OkStatus();
}

// Bounds of consecutive pages, flattened; first page in *first.
absl::StatusOr<std::vector<float>> Bounds(
    const ModelSpec& spec, const google::protobuf::RepeatedPtrField<v1::QuestBounds>& b,
    uint64_t* first) {
  std::vector<float> out;
  const size_t bf = IndexerBoundsFloats(spec);
  for (int i = 0; i < b.size(); ++i) {
    if (i == 0) *first = b[i].page();
    if (b[i].page() != *first + i)
      return absl::InvalidArgumentError("quest bounds must cover consecutive pages in order");
    if (b[i].min_max().size() != bf * 4)
      return absl::InvalidArgumentError(
          absl::StrCat("quest bounds of page ", b[i].page(), " carry ", b[i].min_max().size(),
                       " bytes; expected [", spec.index_layers, "][", spec.kv_heads, "][2][",
                       spec.head_dim, "] fp32 = ", bf * 4));
    const size_t at = out.size();
    out.resize(at + bf);
    std::memcpy(out.data() + at, b[i].min_max().data(), bf * 4);
  }
  return out;
}

}  // namespace

grpc::ServerUnaryReactor* IndexerService::RegisterSession(grpc::CallbackServerContext* ctx,
                                                          const v1::RegisterSessionRequest* req,
                                                          v1::RegisterSessionResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  const ModelSpec spec = SpecFromProto(req->spec());
  if (absl::Status st = spec.Validate(); !st.ok()) return FinishUnary(ctx, st);
  if (req->keys().first_chunk() != 0)
    return FinishUnary(ctx, absl::InvalidArgumentError("registered keys must start at chunk 0"));
  if (absl::Status st = CheckKeys(spec, req->keys()); !st.ok()) return FinishUnary(ctx, st);
  uint64_t first = 0;
  auto bounds = Bounds(spec, req->bounds(), &first);
  if (!bounds.ok()) return FinishUnary(ctx, bounds.status());
  if (req->bounds_size() > 0 && first != 0)
    return FinishUnary(ctx, absl::InvalidArgumentError("registered bounds must start at page 0"));
  absl::Status st = core_->Register(
      req->session_id(), spec, reinterpret_cast<const uint8_t*>(req->keys().data().data()),
      req->keys().chunks(), req->tokens(), bounds->data(), req->bounds_size());
  if (st.ok()) resp->set_chunks(req->keys().chunks());
  return FinishUnary(ctx, st);
}

grpc::ServerUnaryReactor* IndexerService::AppendKeys(grpc::CallbackServerContext* ctx,
                                                     const v1::AppendKeysRequest* req,
                                                     v1::AppendKeysResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  auto spec = core_->SessionSpec(req->session_id());
  if (!spec.ok()) return FinishUnary(ctx, spec.status());
  if (absl::Status st = CheckKeys(*spec, req->keys()); !st.ok()) return FinishUnary(ctx, st);
  uint64_t first = 0;
  auto bounds = Bounds(*spec, req->bounds(), &first);
  if (!bounds.ok()) return FinishUnary(ctx, bounds.status());
  absl::Status st =
      core_->Append(req->session_id(), reinterpret_cast<const uint8_t*>(req->keys().data().data()),
                    req->keys().first_chunk(), req->keys().chunks(), req->tokens(), bounds->data(),
                    first, req->bounds_size());
  if (st.ok()) resp->set_chunks(req->keys().first_chunk() + req->keys().chunks());
  return FinishUnary(ctx, st);
}

grpc::ServerUnaryReactor* IndexerService::Predict(grpc::CallbackServerContext* ctx,
                                                  const v1::PredictRequest* req,
                                                  v1::PredictResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  PredictArgs a;
  a.step = req->step();
  auto h = Floats(req->hidden(), "hidden");
  if (!h.ok()) return FinishUnary(ctx, h.status());
  auto q = Floats(req->query(), "query");
  if (!q.ok()) return FinishUnary(ctx, q.status());
  a.hidden = std::move(*h);
  a.query = std::move(*q);
  a.budget = req->budget() == 0 && req->max_pages() == 0 ? 0.1f : req->budget();
  a.max_pages = req->max_pages();
  if (req->policy() < 0 || req->policy() > static_cast<int>(Policy::kModelQuery))
    return FinishUnary(ctx,
                       absl::InvalidArgumentError(absl::StrCat("unknown policy ", req->policy())));
  a.policy = static_cast<Policy>(req->policy());
  a.sink = req->sink_pages() ? req->sink_pages() : 1;
  a.tail = req->tail_pages() ? req->tail_pages() : 2;
  a.oracle_page_mass.assign(req->oracle_page_mass().begin(), req->oracle_page_mass().end());
  a.history_pages = req->history_pages();
  auto p = core_->Predict(req->session_id(), a);
  if (!p.ok()) return FinishUnary(ctx, p.status());
  v1::ResidentSet* rs = resp->mutable_resident();
  rs->set_session_id(req->session_id());
  rs->set_step(req->step());
  rs->set_total_pages(p->total_pages);
  for (const auto& pg : p->pages) {
    auto* sp = rs->add_pages();
    sp->set_page(pg.page);
    sp->set_score(pg.score);
  }
  resp->set_chunks_scored(p->chunks_scored);
  resp->set_latency_ms(static_cast<float>(p->latency_ms));
  return FinishUnary(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* IndexerService::DropSession(grpc::CallbackServerContext* ctx,
                                                      const v1::DropSessionRequest* req,
                                                      v1::DropSessionResponse*) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  return FinishUnary(ctx, core_->Drop(req->session_id()));
}

grpc::ServerUnaryReactor* IndexerService::LoadWeights(grpc::CallbackServerContext* ctx,
                                                      const v1::LoadWeightsRequest* req,
                                                      v1::LoadWeightsResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  auto path = WeightsPath(req->path());
  if (!path.ok()) return FinishUnary(ctx, path.status());
  uint64_t hash = 0;
  absl::Status st = core_->LoadWeights(*path, &hash);
  if (st.ok()) {
    resp->set_weights_hash(hash);
  } else if (!absl::IsNotFound(st)) {
    // The parser's messages quote the file (its header, tensor names, lengths): they go to
    // the log only, the caller learns the code and the path.
    FM_LOG_WARN("indexer: LoadWeights %s: %s", path->c_str(), st.ToString().c_str());
    st = absl::Status(st.code(), absl::StrCat(req->path(),
                                              " is not a weights file this indexer can load "
                                              "(the reason is in its log)"));
  }
  return FinishUnary(ctx, st);
}

absl::StatusOr<std::string> IndexerService::WeightsPath(const std::string& path) const {
  namespace fs = std::filesystem;
  if (weights_dir_.empty()) {
    if (auth_ && auth_->enforcing())
      return absl::FailedPreconditionError(
          "this indexer loads no weights over RPC: start it with --weights_dir");
    return path;
  }
  std::error_code ec;
  const fs::path dir = fs::weakly_canonical(weights_dir_, ec);
  const fs::path p = fs::weakly_canonical(fs::path(path).is_absolute() ? fs::path(path)
                                                                       : dir / path, ec);
  auto [d, q] = std::mismatch(dir.begin(), dir.end(), p.begin(), p.end());
  if (ec || d != dir.end() || q == p.end())
    return absl::PermissionDeniedError(
        absl::StrCat("weights are loaded from under --weights_dir only; ", path, " is not"));
  return p.string();
}

grpc::ServerUnaryReactor* IndexerService::GetStats(grpc::CallbackServerContext* ctx,
                                                   const v1::IndexerStatsRequest*,
                                                   v1::IndexerStatsResponse* resp) {
  if (absl::Status who = Allow(*ctx); !who.ok()) return FinishUnary(ctx, who);
  const CoreStats s = core_->Stats();
  resp->set_sessions(s.sessions);
  resp->set_chunks(s.chunks);
  resp->set_bytes(s.bytes);
  resp->set_predictions(s.predictions);
  resp->set_weights_hash(s.weights_hash);
  return FinishUnary(ctx, absl::OkStatus());
}

}  // namespace fm::indexer
