#include "services/indexer/indexer_core.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/checksum.h"
#include "common/log.h"
#include "common/safetensors.h"
#include "flashmemory/kernels/quest.h"
#include "kernels/cpu/cpu_kernels.h"

namespace fm::indexer {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct PolicyInfo {
  Policy p;
  const char* name;
};
constexpr PolicyInfo kPolicies[] = {
    {Policy::kDefault, "default"}, {Policy::kLsa, "lsa"},
    {Policy::kQuest, "quest"},     {Policy::kRecency, "recency"},
    {Policy::kRandom, "random"},   {Policy::kSinkRecency, "sink_recency"},
    {Policy::kOracle, "oracle"},   {Policy::kDense, "dense"},
    {Policy::kModelQuery, "model_query"}};

absl::Status CheckSessionId(const std::string& id) {
  if (id.empty() || id.size() > 128)
    return absl::InvalidArgumentError(
        absl::StrCat("session_id must be 1..128 bytes, got ", id.size()));
  return absl::OkStatus();
}

// Pages [0, sink), `chosen` (scored by `score`) and [t0, total), ascending.
std::vector<ScoredPage> WithSinkAndTail(std::vector<uint64_t> chosen,
                                        const std::vector<float>& score, uint64_t sink,
                                        uint64_t t0, uint64_t total) {
  std::sort(chosen.begin(), chosen.end());
  std::vector<ScoredPage> out;
  for (uint64_t p = 0; p < sink; ++p) out.push_back({p, kInf});
  for (uint64_t p : chosen) out.push_back({p, score[p]});
  for (uint64_t p = t0; p < total; ++p) out.push_back({p, kInf});
  return out;
}

// Sink, tail and the kmax best other pages by score (ties: the newer page), ascending.
std::vector<ScoredPage> PickPages(const std::vector<float>& score, uint64_t total, uint64_t kmax,
                                  uint32_t sink, uint32_t tail) {
  const uint64_t s = std::min<uint64_t>(sink, total);
  const uint64_t t0 = total - std::min<uint64_t>(tail, total - s);
  std::vector<uint64_t> cand;
  for (uint64_t p = s; p < t0; ++p) cand.push_back(p);
  const size_t k = std::min<size_t>(kmax, cand.size());
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [&](uint64_t a, uint64_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a > b;
  });
  cand.resize(k);
  return WithSinkAndTail(std::move(cand), score, s, t0, total);
}

uint64_t KeysBytesGrowth(const ModelSpec& sp, uint64_t from, uint64_t to) {
  return (kernels::KeyBlocksBytes(sp.index_dim, to) - kernels::KeyBlocksBytes(sp.index_dim, from)) *
         sp.index_layers;
}

}  // namespace

const char* PolicyName(Policy p) {
  for (const auto& i : kPolicies)
    if (i.p == p) return i.name;
  return "?";
}

absl::StatusOr<Policy> ParsePolicy(const std::string& name) {
  for (const auto& i : kPolicies)
    if (name == i.name) return i.p;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown policy \"", name,
                   "\"; want lsa, quest, recency, random, sink_recency, oracle, dense"));
}

size_t IndexerBoundsFloats(const ModelSpec& spec) {
  return size_t{spec.index_layers} * spec.kv_heads * 2 * spec.head_dim;
}

uint32_t ModelLayerOfIndexLayer(const ModelSpec& spec, uint32_t l) {
  return spec.layers >= spec.index_layers ? spec.layers - spec.index_layers + l
                                          : std::min(l, spec.layers - 1);
}

absl::StatusOr<std::shared_ptr<const Weights>> Weights::Load(const std::string& path) {
  auto f = SafetensorsFile::Open(path);
  if (!f.ok()) return f.status();
  auto w = std::make_shared<Weights>();
  const auto& m = (*f)->metadata();
  auto field = [&](const char* name, uint32_t* out) -> absl::Status {
    auto it = m.find(name);
    if (it == m.end() || !absl::SimpleAtoi(it->second, out))
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": metadata \"", name, "\" missing or not a number"));
    return absl::OkStatus();
  };
  if (auto it = m.find("tower"); it != m.end() && it->second != "chunk") {
    if (it->second != "token_query")
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unknown tower \"", it->second, "\"; want chunk or token_query"));
    w->tower = Tower::kTokenQuery;
  }
  kernels::IndexerShape& s = w->shape;
  for (auto [n, o] : {std::pair{"index_layers", &s.layers},
                      {"index_heads", &s.heads},
                      {"index_dim", &s.dim},
                      {"hidden_dim", &s.hidden}})
    if (absl::Status st = field(n, o); !st.ok()) return st;
  uint64_t hash = 0;
  auto get = [&](uint32_t l, const char* name, std::vector<int64_t> shape,
                 std::vector<std::vector<float>>* out) -> absl::Status {
    auto v = (*f)->GetFloats(absl::StrCat("layer", l, ".", name), shape);
    if (!v.ok()) return v.status();
    hash = Checksum64(v->data(), v->size() * 4) ^ (hash * 0x9e3779b97f4a7c15ull);
    out->push_back(std::move(*v));
    return absl::OkStatus();
  };
  if (w->tower == Tower::kTokenQuery) {
    if (absl::Status st = field("head_dim", &w->head_dim); !st.ok()) return st;
    if (s.layers == 0 || s.heads == 0 || s.hidden == 0 || w->head_dim == 0 ||
        s.dim % w->head_dim != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": bad token_query shape: index_layers, index_heads, hidden_dim "
                             "and head_dim must be > 0 and index_dim a multiple of head_dim"));
    const int64_t O = int64_t{s.heads} * w->head_dim, X = s.hidden;
    for (uint32_t l = 0; l < s.layers; ++l)
      for (absl::Status st : {get(l, "w_q", {O, X}, &w->w_q), get(l, "b_q", {O}, &w->b_q)})
        if (!st.ok()) return st;
    w->hash = hash ? hash : 1;
    return std::shared_ptr<const Weights>(std::move(w));
  }
  for (auto [n, o] : {std::pair{"rank", &s.rank}, {"rope_dims", &s.rope_dims}})
    if (absl::Status st = field(n, o); !st.ok()) return st;
  if (auto it = m.find("rope_theta"); it != m.end() && !absl::SimpleAtof(it->second, &s.rope_theta))
    return absl::InvalidArgumentError(absl::StrCat(path, ": rope_theta is not a number"));
  std::string why;
  if (s.Validate(&why) != kernels::KernelStatus::kOk || s.hidden == 0 || s.rank == 0)
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": bad indexer shape: ", why.empty() ? "hidden and rank must be > 0" : why));
  const int64_t H = s.heads, D = s.dim, R = s.rank, X = s.hidden;
  for (uint32_t l = 0; l < s.layers; ++l)
    for (absl::Status st : {get(l, "w_a", {R, X}, &w->w_a), get(l, "g", {R}, &w->g),
                            get(l, "w_b", {H * D, R}, &w->w_b), get(l, "w_w", {H, X}, &w->w_w)})
      if (!st.ok()) return st;
  w->hash = hash ? hash : 1;
  return std::shared_ptr<const Weights>(std::move(w));
}

absl::Status Weights::Save(const std::string& path) const {
  SafetensorsWriter wr;
  const int64_t H = shape.heads, D = shape.dim, R = shape.rank, X = shape.hidden;
  if (tower == Tower::kTokenQuery) {
    const int64_t O = H * head_dim;
    for (uint32_t l = 0; l < shape.layers; ++l) {
      wr.Add(absl::StrCat("layer", l, ".w_q"), StDType::kF32, {O, X}, w_q[l]);
      wr.Add(absl::StrCat("layer", l, ".b_q"), StDType::kF32, {O}, b_q[l]);
    }
    return wr.Write(path, {{"tower", "token_query"},
                           {"index_layers", absl::StrCat(shape.layers)},
                           {"index_heads", absl::StrCat(shape.heads)},
                           {"index_dim", absl::StrCat(shape.dim)},
                           {"hidden_dim", absl::StrCat(shape.hidden)},
                           {"head_dim", absl::StrCat(head_dim)}});
  }
  for (uint32_t l = 0; l < shape.layers; ++l) {
    const std::string p = absl::StrCat("layer", l, ".");
    wr.Add(p + "w_a", StDType::kF32, {R, X}, w_a[l]);
    wr.Add(p + "g", StDType::kF32, {R}, g[l]);
    wr.Add(p + "w_b", StDType::kF32, {H * D, R}, w_b[l]);
    wr.Add(p + "w_w", StDType::kF32, {H, X}, w_w[l]);
  }
  return wr.Write(path, {{"index_layers", absl::StrCat(shape.layers)},
                         {"index_heads", absl::StrCat(shape.heads)},
                         {"index_dim", absl::StrCat(shape.dim)},
                         {"hidden_dim", absl::StrCat(shape.hidden)},
                         {"rank", absl::StrCat(shape.rank)},
                         {"rope_dims", absl::StrCat(shape.rope_dims)},
                         {"rope_theta", absl::StrCat(shape.rope_theta)}});
}

absl::Status Weights::Matches(const ModelSpec& spec) const {
  auto bad = [&](const char* what, uint64_t have, uint64_t want) {
    return absl::InvalidArgumentError(
        absl::StrCat("indexer weights have ", what, " = ", have, " but the model spec has ", want));
  };
  if (shape.layers != spec.index_layers)
    return bad("index_layers", shape.layers, spec.index_layers);
  if (shape.heads != spec.index_heads) return bad("index_heads", shape.heads, spec.index_heads);
  if (shape.dim != spec.index_dim) return bad("index_dim", shape.dim, spec.index_dim);
  if (shape.hidden != spec.hidden_dim) return bad("hidden_dim", shape.hidden, spec.hidden_dim);
  if (tower == Tower::kTokenQuery) {
    // The predicted query is the model's own, scored against the model's own K.
    if (shape.heads != spec.q_heads)
      return bad("index_heads (token_query: the model's q_heads)", shape.heads, spec.q_heads);
    if (head_dim != spec.head_dim) return bad("head_dim", head_dim, spec.head_dim);
    if (shape.dim != spec.chunk_tokens * spec.kv_heads * spec.head_dim)
      return bad("index_dim (token_query: chunk_tokens x kv_heads x head_dim)", shape.dim,
                 spec.chunk_tokens * spec.kv_heads * spec.head_dim);
  }
  return absl::OkStatus();
}

struct IndexerCore::Session {
  absl::Mutex mu;  // appends write, predictions read
  ModelSpec spec;  // fixed at registration
  uint64_t tokens ABSL_GUARDED_BY(mu) = 0;
  uint64_t chunks ABSL_GUARDED_BY(mu) = 0;
  uint64_t bound_pages ABSL_GUARDED_BY(mu) = 0;
  std::vector<kernels::HugePageBytes> blocks ABSL_GUARDED_BY(mu);  // per index layer, scan layout
  std::vector<float> bounds ABSL_GUARDED_BY(mu);                 // [page][IndexerBoundsFloats]
  uint64_t bytes() const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    uint64_t b = bounds.size() * 4;
    for (const auto& v : blocks) b += v.size();
    return b;
  }
};

std::shared_ptr<IndexerCore::Session> IndexerCore::Find(const std::string& session) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = sessions_.find(session);
  return it == sessions_.end() ? nullptr : it->second;
}

absl::Status IndexerCore::Register(const std::string& session, const ModelSpec& spec,
                                   const uint8_t* keys, uint64_t chunks, uint64_t tokens,
                                   const float* bounds, uint64_t bound_pages) {
  if (absl::Status st = CheckSessionId(session); !st.ok()) return st;
  if (absl::Status st = spec.Validate(); !st.ok()) return st;
  if (spec.index_layers == 0 || spec.index_dim < 64 || (spec.index_dim & (spec.index_dim - 1)))
    return absl::InvalidArgumentError(
        "the model spec needs index_layers > 0 and a power-of-two index_dim >= 64");
  auto s = std::make_shared<Session>();
  s->spec = spec;
  s->blocks.resize(spec.index_layers);
  // Publish the fresh session (replacing any older one), then append its keys.
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session);
    if (it == sessions_.end() && sessions_.size() >= options_.max_sessions)
      return absl::ResourceExhaustedError(
          absl::StrCat("indexer holds the maximum of ", options_.max_sessions, " sessions"));
    if (it != sessions_.end()) {
      absl::ReaderMutexLock sl(&it->second->mu);  // lock order: mu_, then a session's mu
      bytes_ -= it->second->bytes();
      sessions_.erase(it);
    }
    sessions_[session] = s;
  }
  absl::Status a = Append(session, keys, 0, chunks, tokens, bounds, 0, bound_pages);
  if (!a.ok()) {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session);
    if (it != sessions_.end() && it->second == s) {
      absl::ReaderMutexLock sl(&s->mu);
      bytes_ -= s->bytes();
      sessions_.erase(it);
    }
  }
  return a;
}

absl::Status IndexerCore::Append(const std::string& session, const uint8_t* keys,
                                 uint64_t first_chunk, uint64_t chunks, uint64_t tokens,
                                 const float* bounds, uint64_t first_page, uint64_t bound_pages) {
  auto s = Find(session);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", session, "\""));
  absl::ReleasableMutexLock lock(&s->mu);
  const ModelSpec& sp = s->spec;
  // A retry of an append that landed after its caller gave up overlaps what the session
  // holds: the overlap is skipped (appends are idempotent), a gap is refused.
  if (first_chunk < s->chunks && first_chunk + chunks >= s->chunks) {
    const uint64_t skip = s->chunks - first_chunk;
    std::vector<uint8_t> rest;
    const size_t kb = sp.IndexKeyBytes();
    for (uint32_t l = 0; l < sp.index_layers; ++l)
      rest.insert(rest.end(), keys + (size_t{l} * chunks + skip) * kb,
                  keys + (size_t{l} * chunks + chunks) * kb);
    uint64_t bskip = 0;
    if (bound_pages > 0 && first_page < s->bound_pages)
      bskip = std::min(bound_pages, s->bound_pages - first_page);
    const float* b = bounds ? bounds + bskip * IndexerBoundsFloats(sp) : nullptr;
    const uint64_t held = s->chunks;
    lock.Release();
    return Append(session, rest.data(), held, chunks - skip, tokens, b, first_page + bskip,
                  bound_pages - bskip);
  }
  if (first_chunk != s->chunks)
    return absl::FailedPreconditionError(absl::StrCat(
        "keys start at chunk ", first_chunk, " but the session expects chunk ", s->chunks));
  if (tokens < s->tokens || tokens > kMaxSessionTokens)
    return absl::InvalidArgumentError(absl::StrCat("tokens must be in [", s->tokens, ", ",
                                                   kMaxSessionTokens, "] (the session holds ",
                                                   s->tokens, "), got ", tokens));
  const uint64_t new_chunks = first_chunk + chunks;
  if (new_chunks * sp.chunk_tokens > tokens)
    return absl::InvalidArgumentError(absl::StrCat(new_chunks, " chunks of ", sp.chunk_tokens,
                                                   " tokens exceed the history of ", tokens,
                                                   " tokens"));
  if (bound_pages > 0 && first_page != s->bound_pages)
    return absl::FailedPreconditionError(absl::StrCat(
        "bounds start at page ", first_page, " but the session expects page ", s->bound_pages));
  if (bound_pages > 0 && (first_page + bound_pages) * sp.page_tokens > tokens + sp.page_tokens - 1)
    return absl::InvalidArgumentError("bounds for pages beyond the history");
  const uint64_t add =
      KeysBytesGrowth(sp, s->chunks, new_chunks) + bound_pages * IndexerBoundsFloats(sp) * 4;
  if (bytes_.load() + add > options_.max_bytes)
    return absl::ResourceExhaustedError(
        absl::StrCat("indexer memory limit of ", options_.max_bytes, " bytes reached"));
  const size_t kb = sp.IndexKeyBytes();
  for (uint32_t l = 0; l < sp.index_layers; ++l) {
    auto& b = s->blocks[l];
    b.resize(kernels::KeyBlocksBytes(sp.index_dim, new_chunks), 0);
    if (chunks > 0)
      kernels::PackIndexKeys(sp.index_dim, keys + size_t{l} * chunks * kb, first_chunk, chunks,
                             b.data());
  }
  if (bound_pages > 0) {
    const size_t bf = IndexerBoundsFloats(sp);
    s->bounds.insert(s->bounds.end(), bounds, bounds + bound_pages * bf);
    s->bound_pages += bound_pages;
  }
  s->chunks = new_chunks;
  s->tokens = tokens;
  bytes_ += add;
  return absl::OkStatus();
}

absl::StatusOr<ModelSpec> IndexerCore::SessionSpec(const std::string& session) const {
  auto s = Find(session);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", session, "\""));
  return s->spec;
}

absl::Status IndexerCore::Drop(const std::string& session) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end())
    return absl::NotFoundError(absl::StrCat("unknown session \"", session, "\""));
  {
    absl::ReaderMutexLock sl(&it->second->mu);
    bytes_ -= it->second->bytes();
  }
  sessions_.erase(it);
  return absl::OkStatus();
}

absl::Status IndexerCore::LoadWeights(const std::string& path, uint64_t* hash) {
  auto w = Weights::Load(path);
  if (!w.ok()) return w.status();
  if (hash) *hash = (*w)->hash;
  const kernels::IndexerShape& sh = (*w)->shape;
  const uint64_t h = (*w)->hash;
  const uint64_t replaced = SetWeights(*w);
  FM_LOG_INFO(
      "indexer: loaded weights %s (hash %016llx; %s tower, %u index layers x %u heads x %u "
      "dims, hidden %u, %s %u): %s",
      path.c_str(), static_cast<unsigned long long>(h),
      (*w)->tower == Tower::kTokenQuery ? "token_query" : "chunk", sh.layers, sh.heads, sh.dim,
      sh.hidden, (*w)->tower == Tower::kTokenQuery ? "head_dim" : "rank",
      (*w)->tower == Tower::kTokenQuery ? (*w)->head_dim : sh.rank,
      replaced ? absl::StrFormat("replaced the set of hash %016llx",
                                 static_cast<unsigned long long>(replaced))
                     .c_str()
               : absl::StrCat("a new shape, ", Stats().weight_sets, " sets held").c_str());
  return absl::OkStatus();
}

uint64_t IndexerCore::SetWeights(std::shared_ptr<const Weights> w) {
  absl::MutexLock lock(&mu_);
  const kernels::IndexerShape& a = w->shape;
  uint64_t replaced = 0;
  std::erase_if(weights_, [&](const std::shared_ptr<const Weights>& h) {
    const kernels::IndexerShape& b = h->shape;
    const bool same = w->tower == h->tower && a.layers == b.layers && a.heads == b.heads &&
                      a.dim == b.dim && a.hidden == b.hidden;
    if (same) replaced = h->hash;
    return same;
  });
  weights_.push_back(std::move(w));
  return replaced;
}

std::shared_ptr<const Weights> IndexerCore::weights() const {
  absl::ReaderMutexLock lock(&mu_);
  return weights_.empty() ? nullptr : weights_.back();
}

std::shared_ptr<const Weights> IndexerCore::WeightsFor(const ModelSpec& spec) const {
  absl::ReaderMutexLock lock(&mu_);
  // The newest set that fits: a token_query set loaded after a chunk set of the same shape
  // serves (a chunk set fits an own-K spec too).
  for (auto it = weights_.rbegin(); it != weights_.rend(); ++it)
    if ((*it)->Matches(spec).ok()) return *it;
  return nullptr;
}

CoreStats IndexerCore::Stats() const {
  CoreStats st;
  absl::ReaderMutexLock lock(&mu_);
  st.sessions = sessions_.size();
  for (const auto& [id, s] : sessions_) {
    absl::ReaderMutexLock sl(&s->mu);
    st.chunks += s->chunks;
  }
  st.bytes = bytes_.load();
  st.predictions = predictions_.load();
  st.weights_hash = weights_.empty() ? 0 : weights_.back()->hash;
  st.weight_sets = static_cast<uint32_t>(weights_.size());
  return st;
}

namespace {
// INVALID_ARGUMENT unless `query` holds the decode queries of the index layers.
absl::Status CheckIndexQuery(const ModelSpec& sp, const std::vector<float>& query,
                             const char* policy) {
  const size_t qf = size_t{sp.index_layers} * sp.q_heads * sp.head_dim;
  if (query.size() == qf) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      policy, " needs the decode queries of the index layers: ", query.size(),
      " floats; expected [", sp.index_layers, "][", sp.q_heads, "][", sp.head_dim, "] = ", qf));
}
// Quest: each page's upper bound of q.k over its keys (from its per-dim min/max), the best
// over heads and index layers, for the first `np` pages; the others -inf.
void QuestScores(const ModelSpec& sp, const std::vector<float>& bounds, uint64_t np,
                 const float* query, std::vector<float>* score) {
  kernels::AttentionShape as;
  as.layers = sp.index_layers;
  as.q_heads = sp.q_heads;
  as.kv_heads = sp.kv_heads;
  as.head_dim = sp.head_dim;
  as.scale = sp.Scale();
  std::vector<float> ls(np);
  std::fill(score->begin(), score->end(), -kInf);
  for (uint32_t l = 0; l < sp.index_layers; ++l) {
    kernels::QuestPageScores(as, l, query + size_t{l} * sp.q_heads * sp.head_dim, bounds.data(),
                             np, ls.data());
    for (uint64_t p = 0; p < np; ++p) (*score)[p] = std::max((*score)[p], ls[p]);
  }
}

// Sink, tail and kmax other pages taken in turn from two rankings (a's best, b's best, a's
// next, ...; a page already taken is skipped), ascending, scored by a.
std::vector<ScoredPage> PickInterleaved(const std::vector<float>& a, const std::vector<float>& b,
                                        uint64_t total, uint64_t kmax, uint32_t sink,
                                        uint32_t tail) {
  const uint64_t s = std::min<uint64_t>(sink, total);
  const uint64_t t0 = total - std::min<uint64_t>(tail, total - s);
  auto ranked = [&](const std::vector<float>& sc) {
    std::vector<uint64_t> c;
    for (uint64_t p = s; p < t0; ++p) c.push_back(p);
    std::stable_sort(c.begin(), c.end(), [&](uint64_t x, uint64_t y) {
      return sc[x] != sc[y] ? sc[x] > sc[y] : x > y;
    });
    return c;
  };
  const std::vector<uint64_t> ra = ranked(a), rb = ranked(b);
  const uint64_t k = std::min<uint64_t>(kmax, ra.size());
  std::vector<bool> taken(total, false);
  std::vector<uint64_t> chosen;
  for (size_t i = 0, ia = 0, ib = 0; chosen.size() < k; ++i) {
    const std::vector<uint64_t>& r = i % 2 ? rb : ra;
    size_t& at = i % 2 ? ib : ia;
    while (at < r.size() && taken[r[at]]) ++at;
    if (at == r.size()) continue;
    taken[r[at]] = true;
    chosen.push_back(r[at]);
  }
  return WithSinkAndTail(std::move(chosen), a, s, t0, total);
}

// Training-free model_query and the token_query tower: a query [index_layers][q_heads]
// [head_dim] of the model against index keys that hold the model's own K
// (kernels::TokenKeyLogits). A page scores the largest share of one head's attention mass
// its tokens take, over heads and index layers.
absl::Status TokenQueryScores(const ModelSpec& sp, const std::vector<kernels::HugePageBytes>& blocks,
                              uint64_t chunks, uint64_t total, const float* query,
                              std::vector<float>* score) {
  kernels::TokenKeyShape ts;
  ts.tokens = sp.chunk_tokens;
  ts.kv_heads = sp.kv_heads;
  ts.q_heads = sp.q_heads;
  ts.head_dim = sp.head_dim;
  ts.scale = sp.Scale();
  if (ts.dim() != sp.index_dim)
    return absl::FailedPreconditionError(absl::StrCat(
        "model_query and token_query need index keys that hold the model's own K: index_dim = "
        "chunk_tokens x kv_heads x head_dim = ",
        ts.dim(), ", got ", sp.index_dim));
  const uint64_t n = chunks * sp.chunk_tokens;
  std::vector<float> logits(size_t{sp.q_heads} * n), mass(total);
  for (uint32_t l = 0; l < sp.index_layers && n > 0; ++l) {
    if (kernels::TokenKeyLogits(ts, sp.index_dim, query + l * size_t{sp.q_heads} * sp.head_dim,
                                blocks[l].data(), chunks, logits.data()) !=
        kernels::KernelStatus::kOk)
      return absl::InternalError("token query scoring failed");
    for (uint32_t h = 0; h < sp.q_heads; ++h) {
      const float* lg = logits.data() + size_t{h} * n;
      const float mx = *std::max_element(lg, lg + n);
      double z = 0;
      for (uint64_t t = 0; t < n; ++t) z += std::exp(double(lg[t]) - mx);
      std::fill(mass.begin(), mass.end(), 0.0f);
      for (uint64_t t = 0; t < n; ++t)
        mass[t / sp.page_tokens] += static_cast<float>(std::exp(double(lg[t]) - mx) / z);
      for (uint64_t p = 0; p < total; ++p) (*score)[p] = std::max((*score)[p], mass[p]);
    }
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<Prediction> IndexerCore::Predict(const std::string& session, const PredictArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto* v : {&a.hidden, &a.query})
    for (float x : *v)
      if (!std::isfinite(x))
        return absl::InvalidArgumentError(absl::StrCat(
            v == &a.hidden ? "hidden" : "query", " holds a NaN or infinity"));
  auto s = Find(session);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", session, "\""));
  // Before the session lock (lock order); the spec is fixed at registration.
  const std::shared_ptr<const Weights> w = WeightsFor(s->spec), last = weights();
  absl::ReaderMutexLock lock(&s->mu);
  const ModelSpec& sp = s->spec;
  Prediction out;
  out.total_pages = sp.PagesForTokens(s->tokens);
  // The history covered: tokens (the query's position), chunks and bounds of its pages.
  uint64_t tokens = s->tokens, chunks = s->chunks, bound_pages = s->bound_pages;
  if (a.history_pages > 0 && a.history_pages < out.total_pages) {
    out.total_pages = a.history_pages;
    tokens = a.history_pages * sp.page_tokens;
    chunks = std::min<uint64_t>(chunks, a.history_pages * sp.ChunksPerPage());
    bound_pages = std::min(bound_pages, a.history_pages);
  }
  const uint64_t total = out.total_pages;
  if (total == 0) return absl::FailedPreconditionError("the session has no history yet");
  uint64_t budget_pages;
  if (a.max_pages > 0) {
    if (a.max_pages > total)
      return absl::InvalidArgumentError(
          absl::StrCat("max_pages ", a.max_pages, " exceeds the session's ", total, " pages"));
    budget_pages = a.max_pages;
  } else {
    if (!(a.budget > 0.0f && a.budget <= 1.0f))
      return absl::InvalidArgumentError(absl::StrCat("budget must be in (0, 1], got ", a.budget));
    budget_pages = static_cast<uint64_t>(std::ceil(double(a.budget) * total));
  }
  Policy policy = a.policy == Policy::kDefault ? options_.default_policy : a.policy;
  // The default policy is lsa where it can run: weights loaded that fit the session's spec.
  if (policy == Policy::kLsa && a.policy == Policy::kDefault && (!w || !w->Matches(sp).ok()))
    policy = Policy::kSinkRecency;
  out.policy = policy;
  const uint32_t sink = policy == Policy::kRecency ? 0 : a.sink;
  const uint32_t tail = a.tail;
  const uint64_t fixed = std::min<uint64_t>(total, uint64_t{sink} + tail);
  const uint64_t kmax = budget_pages > fixed ? budget_pages - fixed : 0;
  std::vector<float> score(total, 0.0f);
  switch (policy) {
    case Policy::kLsa: {
      if (!w) {
        if (!last)
          return absl::FailedPreconditionError(
              "policy lsa needs indexer weights; call LoadWeights");
        return absl::FailedPreconditionError(last->Matches(sp).message());
      }
      if (a.hidden.size() != sp.hidden_dim)
        return absl::InvalidArgumentError(absl::StrCat(
            "hidden has ", a.hidden.size(), " floats; expected hidden_dim = ", sp.hidden_dim));
      const kernels::IndexerShape& is = w->shape;
      if (w->tower == Tower::kTokenQuery) {
        // The predicted query of each index layer, q_l = w_q h + b_q, scored as model_query.
        const size_t o = size_t{is.heads} * w->head_dim;
        std::vector<float> q(size_t{is.layers} * o);
        for (uint32_t l = 0; l < is.layers; ++l)
          for (size_t r = 0; r < o; ++r) {
            const float* row = w->w_q[l].data() + r * is.hidden;
            double acc = w->b_q[l][r];
            for (uint32_t x = 0; x < is.hidden; ++x) acc += double(row[x]) * a.hidden[x];
            q[l * o + r] = static_cast<float>(acc);
          }
        if (absl::Status st = TokenQueryScores(sp, s->blocks, chunks, total, q.data(), &score);
            !st.ok())
          return st;
        out.chunks_scored = chunks * is.layers;
        if (bound_pages == 0) {
          out.pages = PickPages(score, total, kmax, sink, tail);
          break;
        }
        // With the pages' Quest bounds, half the set by the bound of the same predicted
        // query: the bound favours pages holding an outlying key (a record, a needle) that
        // the next steps' queries may turn to, the tower the pages this query's attention
        // goes to (on single1's 64K traces each step's most attended page was kept 0.78 of
        // the time at 5 %, against 0.73 by the tower's share alone and 0.75 by the bound
        // alone; at 8K-16K 0.49 against 0.50 and 0.39).
        std::vector<float> bound(total);
        QuestScores(sp, s->bounds, std::min(total, bound_pages), q.data(), &bound);
        out.pages = PickInterleaved(score, bound, total, kmax, sink, tail);
        break;
      }
      std::vector<float> q(size_t{is.layers} * is.heads * is.dim), hw(size_t{is.layers} * is.heads);
      for (uint32_t l = 0; l < is.layers; ++l) {
        const kernels::IndexerLayerWeights lw{w->w_a[l].data(), w->g[l].data(), w->w_b[l].data(),
                                              w->w_w[l].data()};
        kernels::IndexerQuery(is, lw, a.hidden.data(), tokens,
                              q.data() + size_t{l} * is.heads * is.dim,
                              hw.data() + size_t{l} * is.heads);
      }
      std::vector<const uint8_t*> ptrs;
      for (const auto& b : s->blocks) ptrs.push_back(b.data());
      std::vector<float> logits(size_t{is.layers} * chunks);
      if (chunks > 0)
        kernels::ScoreKeyBlocks(is, q.data(), hw.data(), ptrs.data(), chunks,
                                kernels::ScoreMath::kFast, logits.data());
      out.chunks_scored = chunks * is.layers;
      kernels::SelectParams p;
      p.chunk_tokens = sp.chunk_tokens;
      p.page_tokens = sp.page_tokens;
      p.total_pages = total;
      p.kmax = static_cast<uint32_t>(kmax);
      p.sink = sink;
      p.tail = tail;
      p.best_share = options_.lsa_best_share;
      std::vector<kernels::ScoredPageOut> picked;
      if (kernels::SelectPages(is.layers, logits.data(), chunks, p, &picked) !=
          kernels::KernelStatus::kOk)
        return absl::InternalError("page selection failed");
      for (const auto& pg : picked) out.pages.push_back({pg.page, pg.score});
      break;
    }
    case Policy::kQuest: {
      if (absl::Status st = CheckIndexQuery(sp, a.query, "quest"); !st.ok()) return st;
      if (bound_pages == 0)
        return absl::FailedPreconditionError("quest needs page bounds; none were registered");
      QuestScores(sp, s->bounds, std::min(total, bound_pages), a.query.data(), &score);
      out.pages = PickPages(score, total, kmax, sink, tail);
      break;
    }
    case Policy::kModelQuery: {
      if (absl::Status st = CheckIndexQuery(sp, a.query, "model_query"); !st.ok()) return st;
      if (absl::Status st = TokenQueryScores(sp, s->blocks, chunks, total, a.query.data(), &score);
          !st.ok())
        return st;
      out.chunks_scored = chunks * sp.index_layers;
      out.pages = PickPages(score, total, kmax, sink, tail);
      break;
    }
    case Policy::kRecency:
    case Policy::kSinkRecency:
      for (uint64_t p = 0; p < total; ++p) score[p] = static_cast<float>(p);
      out.pages = PickPages(score, total, kmax, sink, tail);
      break;
    case Policy::kRandom: {
      const uint64_t seed =
          Checksum64(session.data(), session.size()) ^ (a.step * 0x9e3779b97f4a7c15ull);
      for (uint64_t p = 0; p < total; ++p) {
        uint64_t x = seed ^ (p * 0xbf58476d1ce4e5b9ull);
        x ^= x >> 31;
        x *= 0x94d049bb133111ebull;
        x ^= x >> 29;
        score[p] = static_cast<float>(x >> 40);
      }
      out.pages = PickPages(score, total, kmax, sink, tail);
      break;
    }
    case Policy::kOracle:
      if (a.oracle_page_mass.size() < total)
        return absl::InvalidArgumentError(absl::StrCat(
            "oracle needs the true page mass of every page: ", a.oracle_page_mass.size(),
            " values for ", total, " pages"));
      for (uint64_t p = 0; p < total; ++p) score[p] = a.oracle_page_mass[p];
      out.pages = PickPages(score, total, kmax, sink, tail);
      break;
    case Policy::kDense:
      out.pages = PickPages(score, total, total, 0, 0);
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown policy ", int(policy)));
  }
  ++predictions_;
  out.latency_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace fm::indexer
