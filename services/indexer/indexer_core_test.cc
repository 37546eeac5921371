#include "services/indexer/indexer_core.h"

#include <gtest/gtest.h>

#include <random>

#include "common/safetensors.h"
#include "common/status_matchers.h"
#include "flashmemory/kernels/quest.h"
#include "workload/generator.h"

namespace fm::indexer {
namespace {
using absl::StatusCode;
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;

std::unique_ptr<workload::Session> MakeSession(uint64_t seed = 2) {
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.seed = seed;
  c.prefill_tokens = 3000;
  c.steps = 64;
  return *workload::Session::Generate(c);
}

std::shared_ptr<Weights> RandomWeights(const ModelSpec& spec, uint32_t rank, uint64_t seed) {
  auto w = std::make_shared<Weights>();
  w->shape = workload::IndexerShapeFor(spec, rank);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  auto rnd = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
  };
  const auto& s = w->shape;
  for (uint32_t l = 0; l < s.layers; ++l) {
    w->w_a.push_back(rnd(size_t{s.rank} * s.hidden));
    w->g.push_back(std::vector<float>(s.rank, 1.0f));
    w->w_b.push_back(rnd(size_t{s.heads} * s.dim * s.rank));
    w->w_w.push_back(rnd(size_t{s.heads} * s.hidden));
  }
  w->hash = 7;
  return w;
}

std::vector<uint8_t> Keys(const workload::Session& s, uint64_t first, uint64_t n) {
  const size_t kb = s.spec().IndexKeyBytes();
  std::vector<uint8_t> out;
  for (uint32_t l = 0; l < s.spec().index_layers; ++l)
    out.insert(out.end(), s.index_keys(l).begin() + first * kb,
               s.index_keys(l).begin() + (first + n) * kb);
  return out;
}

std::vector<uint64_t> Pages(const Prediction& p) {
  std::vector<uint64_t> v;
  for (const auto& x : p.pages) v.push_back(x.page);
  return v;
}

TEST(IndexerCore, SimplePoliciesPickTheExpectedPages) {
  auto s = MakeSession();
  IndexerCore core;
  const uint64_t tokens = 3000;  // 46 full pages + 1 partial: 47 pages, 736 sealed chunks
  const uint64_t chunks = tokens / 64 * 16;
  auto keys = Keys(*s, 0, chunks);
  ASSERT_THAT(core.Register("a", s->spec(), keys.data(), chunks, tokens), IsOk());
  PredictArgs a;
  a.budget = 0.1f;  // ceil(4.7) = 5 pages: sink + 2 tail + 2
  a.policy = Policy::kSinkRecency;
  auto p = core.Predict("a", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(p->total_pages, 47u);
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 43, 44, 45, 46}));
  a.policy = Policy::kRecency;  // no sink
  EXPECT_EQ(Pages(*core.Predict("a", a)), (std::vector<uint64_t>{42, 43, 44, 45, 46}));
  a.policy = Policy::kDense;
  EXPECT_EQ(core.Predict("a", a)->pages.size(), 47u);
  a.policy = Policy::kOracle;
  a.oracle_page_mass.assign(47, 0.0f);
  a.oracle_page_mass[7] = 0.5f, a.oracle_page_mass[20] = 0.3f, a.oracle_page_mass[45] = 0.9f;
  EXPECT_EQ(Pages(*core.Predict("a", a)), (std::vector<uint64_t>{0, 7, 20, 45, 46}));
  a.policy = Policy::kRandom;
  a.max_pages = 10;
  auto r1 = core.Predict("a", a), r2 = core.Predict("a", a);
  a.step = 64;
  auto r3 = core.Predict("a", a);
  EXPECT_EQ(Pages(*r1), Pages(*r2));  // seeded by session and step
  EXPECT_NE(Pages(*r1), Pages(*r3));
  EXPECT_EQ(r1->pages.size(), 10u);
  // A prediction over the first 40 pages only: 0.125 x 40 = 5 pages, the tail 38 and 39.
  a = PredictArgs();
  a.budget = 0.125f;
  a.policy = Policy::kSinkRecency;
  a.history_pages = 40;
  p = core.Predict("a", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(p->total_pages, 40u);
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 36, 37, 38, 39}));
  a.history_pages = 100;  // more than the session holds: all of it (ceil(5.875) = 6 pages)
  EXPECT_EQ(Pages(*core.Predict("a", a)), (std::vector<uint64_t>{0, 42, 43, 44, 45, 46}));
}

TEST(IndexerCore, LsaMatchesTheKernelPipelineAcrossAppends) {
  auto s = MakeSession();
  const ModelSpec& sp = s->spec();
  IndexerCore core;
  auto w = RandomWeights(sp, 32, 1);
  core.SetWeights(w);
  // Register the first 10 pages, then append page by page up to 46 sealed pages.
  const uint64_t cpp = sp.ChunksPerPage();
  auto k0 = Keys(*s, 0, 10 * cpp);
  ASSERT_THAT(core.Register("a", sp, k0.data(), 10 * cpp, 10 * 64), IsOk());
  for (uint64_t pg = 10; pg < 46; ++pg) {
    auto k = Keys(*s, pg * cpp, cpp);
    ASSERT_THAT(core.Append("a", k.data(), pg * cpp, cpp, (pg + 1) * 64 + 10), IsOk());
  }
  const uint64_t chunks = 46 * cpp, tokens = 46 * 64 + 10;
  PredictArgs a;
  a.policy = Policy::kLsa;
  a.budget = 0.25f;
  a.hidden.assign(s->hidden(0), s->hidden(0) + sp.hidden_dim);
  auto p = core.Predict("a", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(p->chunks_scored, chunks);
  // The same arithmetic by hand: tower, scan of all keys packed at once, selection.
  const auto& is = w->shape;
  std::vector<float> q(is.heads * is.dim), hw(is.heads);
  kernels::IndexerQuery(is, {w->w_a[0].data(), w->g[0].data(), w->w_b[0].data(), w->w_w[0].data()},
                        a.hidden.data(), tokens, q.data(), hw.data());
  std::vector<uint8_t> blocks(kernels::KeyBlocksBytes(is.dim, chunks), 0);
  kernels::PackIndexKeys(is.dim, s->index_keys(0).data(), 0, chunks, blocks.data());
  const uint8_t* ptr = blocks.data();
  std::vector<float> logits(chunks);
  kernels::ScoreKeyBlocks(is, q.data(), hw.data(), &ptr, chunks, kernels::ScoreMath::kFast,
                          logits.data());
  kernels::SelectParams sel;
  sel.total_pages = 47;
  sel.kmax = 12 - 3;  // ceil(0.25 * 47) = 12 pages in all
  sel.best_share = CoreOptions{}.lsa_best_share;
  std::vector<kernels::ScoredPageOut> want;
  kernels::SelectPages(1, logits.data(), chunks, sel, &want);
  ASSERT_EQ(p->pages.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(p->pages[i].page, want[i].page);
    EXPECT_EQ(p->pages[i].score, want[i].score);
  }
  // Over its first 30 pages, the prediction of a session that holds just those (its query
  // at their end).
  ASSERT_THAT(core.Register("b", sp, Keys(*s, 0, 30 * cpp).data(), 30 * cpp, 30 * 64), IsOk());
  a.history_pages = 30;
  auto limited = core.Predict("a", a);
  a.history_pages = 0;
  auto whole = core.Predict("b", a);
  ASSERT_THAT(limited.status(), IsOk());
  ASSERT_THAT(whole.status(), IsOk());
  EXPECT_EQ(limited->total_pages, 30u);
  EXPECT_EQ(limited->chunks_scored, 30 * cpp);
  ASSERT_EQ(limited->pages.size(), whole->pages.size());
  for (size_t i = 0; i < whole->pages.size(); ++i) {
    EXPECT_EQ(limited->pages[i].page, whole->pages[i].page);
    EXPECT_EQ(limited->pages[i].score, whole->pages[i].score);
  }
}

TEST(IndexerCore, QuestScoresPagesByTheirBounds) {
  auto s = MakeSession();
  const ModelSpec& sp = s->spec();
  IndexerCore core;
  const uint64_t pages = 46, chunks = pages * sp.ChunksPerPage(), tokens = pages * 64;
  auto keys = Keys(*s, 0, chunks);
  // Bounds of the index layers (tiny: 1 index layer = model layer 1) from the pages.
  kernels::AttentionShape full{sp.layers,   sp.q_heads, sp.kv_heads,
                               sp.head_dim, 64,         kernels::ElemType::kF32};
  const size_t bf = IndexerBoundsFloats(sp);
  std::vector<float> bounds(pages * bf), all(kernels::QuestBoundsFloats(full));
  std::vector<uint8_t> page(sp.PageBytes());
  for (uint64_t pg = 0; pg < pages; ++pg) {
    s->FillPage(pg, page.data());
    kernels::QuestBounds(full, page.data(), 64, all.data());
    const uint32_t ml = ModelLayerOfIndexLayer(sp, 0);
    std::copy(all.begin() + ml * (all.size() / sp.layers),
              all.begin() + (ml + 1) * (all.size() / sp.layers), bounds.begin() + pg * bf);
  }
  ASSERT_THAT(core.Register("a", sp, keys.data(), chunks, tokens, bounds.data(), pages), IsOk());
  PredictArgs a;
  a.policy = Policy::kQuest;
  a.max_pages = 8;
  a.query.resize(sp.q_heads * sp.head_dim);
  for (uint32_t h = 0; h < sp.q_heads; ++h)
    s->ModelQuery(0, ModelLayerOfIndexLayer(sp, 0), h, a.query.data() + h * sp.head_dim);
  auto p = core.Predict("a", a);
  ASSERT_THAT(p.status(), IsOk());
  kernels::AttentionShape one{1, sp.q_heads, sp.kv_heads, sp.head_dim, 64, kernels::ElemType::kF32};
  std::vector<float> score(pages);
  kernels::reference::QuestPageScores(one, 0, a.query.data(), bounds.data(), pages, score.data());
  std::vector<uint64_t> mid;
  for (uint64_t pg = 1; pg < pages - 2; ++pg) mid.push_back(pg);
  std::sort(mid.begin(), mid.end(), [&](uint64_t x, uint64_t y) { return score[x] > score[y]; });
  std::vector<uint64_t> want = {0, pages - 2, pages - 1};
  want.insert(want.end(), mid.begin(), mid.begin() + 5);
  std::sort(want.begin(), want.end());
  EXPECT_EQ(Pages(*p), want);
}

TEST(IndexerCore, BadInputGetsAPreciseStatusAndLeavesOtherSessionsAlone) {
  auto s = MakeSession();
  const ModelSpec& sp = s->spec();
  CoreOptions o;
  o.max_bytes = 80000;  // one tiny session holds 50048 bytes of keys
  IndexerCore core(o);
  const uint64_t chunks = 46 * 16;
  auto keys = Keys(*s, 0, chunks);
  ASSERT_THAT(core.Register("good", sp, keys.data(), chunks, 46 * 64), IsOk());
  PredictArgs a;
  a.policy = Policy::kSinkRecency;
  EXPECT_THAT(core.Predict("nope", a).status(), StatusIs(StatusCode::kNotFound));
  a.budget = 0.0f;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  a.budget = 1.5f;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  a.budget = 0.1f;
  a.max_pages = 47;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  a.max_pages = 0;
  a.policy = Policy::kLsa;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kFailedPrecondition));
  // Weights of another spec only.
  core.SetWeights(RandomWeights(*PresetSpec("bench"), 16, 3));
  a.hidden.assign(sp.hidden_dim, 0.0f);
  auto st = core.Predict("good", a).status();
  EXPECT_THAT(st, StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_NE(st.message().find("indexer weights have index_layers = 3"), std::string::npos) << st;
  core.SetWeights(RandomWeights(sp, 16, 3));
  a.hidden.assign(sp.hidden_dim - 1, 0.0f);
  st = core.Predict("good", a).status();
  EXPECT_THAT(st, StatusIs(StatusCode::kInvalidArgument));
  EXPECT_NE(st.message().find("expected hidden_dim = 256"), std::string::npos) << st;
  a.hidden.assign(sp.hidden_dim, 0.0f);
  a.hidden[7] = std::nanf("");  // every score would be 0
  EXPECT_THAT(core.Predict("good", a).status(),
              StatusIs(StatusCode::kInvalidArgument, "hidden holds a NaN or infinity"));
  a.hidden[7] = INFINITY;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  a.hidden.assign(sp.hidden_dim, 0.0f);
  a.policy = Policy::kQuest;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  a.query.assign(sp.q_heads * sp.head_dim, -INFINITY);
  EXPECT_THAT(core.Predict("good", a).status(),
              StatusIs(StatusCode::kInvalidArgument, "query holds a NaN or infinity"));
  a.query.assign(sp.q_heads * sp.head_dim, 0.0f);
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kFailedPrecondition));
  a.policy = Policy::kOracle;
  EXPECT_THAT(core.Predict("good", a).status(), StatusIs(StatusCode::kInvalidArgument));
  // Appends: out of order, beyond the history, unknown session.
  EXPECT_THAT(core.Append("good", keys.data(), 5, 1, 46 * 64),
              StatusIs(StatusCode::kFailedPrecondition));
  // A retry of the last append (it landed after its caller gave up) is accepted as a no-op.
  EXPECT_THAT(core.Append("good", keys.data(), chunks - 16, 16, 46 * 64), IsOk());
  EXPECT_EQ(core.Stats().chunks, chunks);
  EXPECT_THAT(core.Append("good", keys.data(), chunks, 16, 46 * 64),
              StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(core.Append("nope", keys.data(), 0, 1, 64), StatusIs(StatusCode::kNotFound));
  // A history beyond any session's (it left the session in a bad state before).
  EXPECT_THAT(core.Append("good", keys.data(), chunks, 0, UINT64_MAX),
              StatusIs(StatusCode::kInvalidArgument, "tokens must be in [2944, 16777216]"));
  EXPECT_THAT(core.Register("huge", sp, keys.data(), 1, UINT64_MAX),
              StatusIs(StatusCode::kInvalidArgument, "tokens must be in"));
  EXPECT_THAT(core.Register("", sp, keys.data(), 1, 64), StatusIs(StatusCode::kInvalidArgument));
  ModelSpec noindex = sp;
  noindex.index_layers = 0;
  EXPECT_THAT(core.Register("x", noindex, keys.data(), 1, 64),
              StatusIs(StatusCode::kInvalidArgument));
  // The memory limit: a second session of the same size does not fit.
  EXPECT_THAT(core.Register("big", sp, keys.data(), chunks, 46 * 64),
              StatusIs(StatusCode::kResourceExhausted));
  EXPECT_THAT(core.Predict("big", a).status(), StatusIs(StatusCode::kNotFound));
  // Weights files: missing, or shapes that disagree with their own metadata.
  EXPECT_THAT(core.LoadWeights("/nonexistent.safetensors"), StatusIs(StatusCode::kNotFound));
  auto w = RandomWeights(sp, 16, 3);
  w->w_b[0].resize(10);
  const std::string path = ::testing::TempDir() + "/bad_weights.safetensors";
  SafetensorsWriter wr;  // w_b with 10 floats, claimed by metadata to be [heads * dim, rank]
  // The writer keeps pointers to the tensors until Write: they must outlive it.
  std::vector<float> tiny(10), ones(16, 1.0f);
  const auto full = RandomWeights(sp, 16, 3);
  wr.Add("layer0.w_a", StDType::kF32, {16, 256}, full->w_a[0]);
  wr.Add("layer0.g", StDType::kF32, {16}, ones);
  wr.Add("layer0.w_b", StDType::kF32, {10}, tiny);
  wr.Add("layer0.w_w", StDType::kF32, {4, 256}, full->w_w[0]);
  ASSERT_THAT(wr.Write(path, {{"index_layers", "1"},
                              {"index_heads", "4"},
                              {"index_dim", "64"},
                              {"hidden_dim", "256"},
                              {"rank", "16"},
                              {"rope_dims", "32"}}),
              IsOk());
  EXPECT_THAT(core.LoadWeights(path), StatusIs(StatusCode::kInvalidArgument));
  // The good session still answers exactly as before.
  a = PredictArgs{};
  a.policy = Policy::kSinkRecency;
  EXPECT_EQ(Pages(*core.Predict("good", a)), (std::vector<uint64_t>{0, 42, 43, 44, 45}));
  EXPECT_THAT(core.Drop("good"), IsOk());
  EXPECT_THAT(core.Drop("good"), StatusIs(StatusCode::kNotFound));
  EXPECT_EQ(core.Stats().bytes, 0u);
}

TEST(IndexerCore, WeightsRoundTripThroughSafetensors) {
  auto s = MakeSession();
  auto w = RandomWeights(s->spec(), 8, 5);
  const std::string path = ::testing::TempDir() + "/w.safetensors";
  ASSERT_THAT(w->Save(path), IsOk());
  IndexerCore core;
  uint64_t hash = 0;
  ASSERT_THAT(core.LoadWeights(path, &hash), IsOk());
  EXPECT_NE(hash, 0u);
  EXPECT_EQ(core.weights()->w_b[0], w->w_b[0]);
  EXPECT_THAT(core.weights()->Matches(s->spec()), IsOk());
  EXPECT_EQ(core.Stats().weights_hash, hash);
  EXPECT_EQ(core.Stats().weight_sets, 1u);
  // One set per index shape: weights for another spec join, weights for a held shape
  // replace it.
  const ModelSpec bench = *PresetSpec("bench");
  core.SetWeights(RandomWeights(bench, 8, 6));
  EXPECT_EQ(core.Stats().weight_sets, 2u);
  ASSERT_NE(core.WeightsFor(s->spec()), nullptr);
  EXPECT_EQ(core.WeightsFor(s->spec())->w_b[0], w->w_b[0]);
  ASSERT_NE(core.WeightsFor(bench), nullptr);
  EXPECT_THAT(core.WeightsFor(bench)->Matches(bench), IsOk());
  auto w2 = RandomWeights(s->spec(), 8, 9);
  EXPECT_EQ(core.SetWeights(w2), hash) << "the set it replaced";
  EXPECT_EQ(core.Stats().weight_sets, 2u);
  EXPECT_EQ(core.WeightsFor(s->spec()), w2);
  ModelSpec none = bench;
  none.index_heads = 4;
  EXPECT_EQ(core.WeightsFor(none), nullptr);
}

}  // namespace
}  // namespace fm::indexer

namespace fm::indexer {
namespace {

// Index keys that hold the model's own K (a 1-layer GQA 4:2 model): one token of page 9
// matches the query of head 0 and one of page 21 that of head 3 (the other KV group).
struct OwnKCase {
  ModelSpec sp;
  uint64_t tokens = 40 * 64, chunks = 40 * 64 / 4;
  std::vector<float> q;       // [q_heads][head_dim]
  std::vector<uint8_t> keys;  // [chunks][IndexKeyBytes]
  std::vector<float> bounds;  // [page][kv head][min|max][head_dim] (Quest)
  // A token_query tower that passes the model's query through: q = h.
  std::shared_ptr<Weights> IdentityTower() const {
    auto w = std::make_shared<Weights>();
    w->tower = Tower::kTokenQuery;
    w->shape.layers = 1;
    w->shape.heads = 4;
    w->shape.dim = sp.index_dim;
    w->shape.hidden = sp.hidden_dim;
    w->head_dim = 32;
    w->w_q.assign(1, std::vector<float>(128 * 128, 0.0f));
    for (int i = 0; i < 128; ++i) w->w_q[0][i * 128 + i] = 1.0f;
    w->b_q.assign(1, std::vector<float>(128, 0.0f));
    return w;
  }
  OwnKCase() {
    sp.layers = 1;
    sp.q_heads = 4;
    sp.kv_heads = 2;
    sp.head_dim = 32;
    sp.dtype = DType::kBf16;
    sp.index_layers = 1;
    sp.index_heads = 4;
    sp.index_dim = 4 * 2 * 32;
    sp.chunk_tokens = 4;
    sp.hidden_dim = 4 * 32;  // the index layer's query (docs/own-model.md)
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 0.3f);
    std::vector<float> k(tokens * 2 * 32);
    for (float& x : k) x = nd(rng);
    q.assign(4 * 32, 0.0f);
    for (uint32_t i = 0; i < 32; ++i) {
      q[0 * 32 + i] = (i % 2 ? 1.0f : -1.0f) * 4;
      q[3 * 32 + i] = (i % 3 ? 1.0f : -1.0f) * 4;
      k[(9 * 64 + 17) * 64 + 0 * 32 + i] = q[0 * 32 + i] / 4;   // head 0 reads KV head 0
      k[(21 * 64 + 50) * 64 + 1 * 32 + i] = q[3 * 32 + i] / 4;  // head 3 reads KV head 1
    }
    keys.resize(chunks * sp.IndexKeyBytes());
    for (uint64_t c = 0; c < chunks; ++c)
      kernels::CompressIndexKey(sp.index_dim, k.data() + c * sp.index_dim,
                                keys.data() + c * sp.IndexKeyBytes());
    const uint64_t pages = tokens / 64;
    bounds.assign(pages * 2 * 2 * 32, 0.0f);
    for (uint64_t p = 0; p < pages; ++p)
      for (uint32_t kv = 0; kv < 2; ++kv)
        for (uint32_t j = 0; j < 32; ++j) {
          float mn = 1e30f, mx = -1e30f;
          for (uint64_t t = p * 64; t < (p + 1) * 64; ++t) {
            mn = std::min(mn, k[t * 64 + kv * 32 + j]);
            mx = std::max(mx, k[t * 64 + kv * 32 + j]);
          }
          bounds[((p * 2 + kv) * 2 + 0) * 32 + j] = mn;
          bounds[((p * 2 + kv) * 2 + 1) * 32 + j] = mx;
        }
  }
};

// model_query: the model's own query against its own K. With room for two pages beyond
// sink and tail, both needle pages are chosen. A spec whose index_dim is not chunk_tokens x
// kv_heads x head_dim is refused with the reason.
TEST(IndexerCore, ModelQueryKeepsThePagesTheModelsQueryAttendsTo) {
  OwnKCase c;
  const ModelSpec& sp = c.sp;
  const uint64_t tokens = c.tokens, chunks = c.chunks;
  const std::vector<float>& q = c.q;
  const std::vector<uint8_t>& keys = c.keys;
  ASSERT_THAT(sp.Validate(), IsOk());
  IndexerCore core;
  ASSERT_THAT(core.Register("mq", sp, keys.data(), chunks, tokens), IsOk());
  PredictArgs a;
  a.policy = Policy::kModelQuery;
  a.max_pages = 5;
  a.query = q;
  auto p = core.Predict("mq", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 9, 21, 38, 39}));
  EXPECT_EQ(p->policy, Policy::kModelQuery);

  a.query.resize(5);
  EXPECT_THAT(core.Predict("mq", a).status(), StatusIs(StatusCode::kInvalidArgument));
  ModelSpec other = sp;
  other.index_dim = 128;
  std::vector<uint8_t> small(chunks * other.IndexKeyBytes(), 0);
  ASSERT_THAT(core.Register("mq2", other, small.data(), chunks, tokens), IsOk());
  a.query = q;
  auto bad = core.Predict("mq2", a);
  EXPECT_THAT(bad.status(), StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_NE(bad.status().message().find("index_dim = chunk_tokens x kv_heads x head_dim = 256"),
            std::string::npos)
      << bad.status();
}

// lsa with a token_query tower (q = w_q h + b_q, scored as model_query): the identity tower
// fed the model's query picks exactly model_query's pages, and so does a tower whose bias
// alone is that query; the set survives Save/Load with its kind, and a spec whose heads or
// index keys do not hold the model's own query and K is refused by name.
TEST(IndexerCore, TokenQueryTowerScoresItsPredictedQueryAsTheModelDoes) {
  OwnKCase c;
  const ModelSpec& sp = c.sp;
  IndexerCore core;
  ASSERT_THAT(core.Register("tq", sp, c.keys.data(), c.chunks, c.tokens), IsOk());
  auto w = c.IdentityTower();
  const std::string path = ::testing::TempDir() + "/tq.safetensors";
  ASSERT_THAT(w->Save(path), IsOk());
  uint64_t hash = 0;
  ASSERT_THAT(core.LoadWeights(path, &hash), IsOk());
  auto loaded = Weights::Load(path);
  ASSERT_THAT(loaded, IsOk());
  EXPECT_EQ((*loaded)->tower, Tower::kTokenQuery);
  EXPECT_EQ((*loaded)->w_q[0], w->w_q[0]);
  PredictArgs a;
  a.policy = Policy::kLsa;
  a.max_pages = 5;
  a.hidden = c.q;
  auto p = core.Predict("tq", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(p->policy, Policy::kLsa);
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 9, 21, 38, 39}));
  auto bias = std::make_shared<Weights>(*w);  // w_q = 0, b_q = the query
  bias->hash = 42;
  bias->w_q[0].assign(128 * 128, 0.0f);
  bias->b_q[0] = c.q;
  EXPECT_EQ(core.SetWeights(bias), hash) << "replaces the set of its kind and shape";
  // A chunk set of the same shape is held beside it; the newest set that fits serves.
  EXPECT_EQ(core.SetWeights(RandomWeights(sp, 8, 9)), 0u);
  auto again = std::make_shared<Weights>(*bias);
  again->hash = 43;
  EXPECT_EQ(core.SetWeights(again), bias->hash) << "replaces the token_query set only";
  EXPECT_EQ(core.Stats().weight_sets, 2u);
  a.hidden.assign(128, 0.0f);
  p = core.Predict("tq", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 9, 21, 38, 39})) << "the newest set serves";
  a.hidden.assign(128, 0.0f);
  p = core.Predict("tq", a);
  ASSERT_THAT(p.status(), IsOk());
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 9, 21, 38, 39}));
  // A spec whose index heads are not the model's query heads: a chunk tower of this shape
  // would fit it, a token_query tower does not.
  ModelSpec other = sp;
  other.q_heads = 8;
  auto heads = w->Matches(other);
  EXPECT_THAT(heads, StatusIs(StatusCode::kInvalidArgument));
  EXPECT_NE(heads.message().find("index_heads (token_query: the model's q_heads) = 4 but the "
                                 "model spec has 8"),
            std::string::npos)
      << heads;
  Weights chunk_kind = *w;
  chunk_kind.tower = Tower::kChunk;
  EXPECT_THAT(chunk_kind.Matches(other), IsOk());
  other = sp;
  other.head_dim = 64;
  other.index_dim = 4 * 2 * 32;
  auto m = w->Matches(other);
  EXPECT_THAT(m, StatusIs(StatusCode::kInvalidArgument));
  EXPECT_NE(m.message().find("head_dim = 32 but the model spec has 64"), std::string::npos) << m;
}

// With Quest bounds registered, lsa's token_query set takes its pages in turn from the
// tower's ranking and from the bound of the same predicted query: both needle pages (first
// in both rankings) and, after them, each ranking's next best page.
TEST(IndexerCore, TokenQueryTowerTakesHalfItsSetByTheQuestBound) {
  OwnKCase c;
  const ModelSpec& sp = c.sp;
  IndexerCore core;
  ASSERT_THAT(core.Register("tq", sp, c.keys.data(), c.chunks, c.tokens, c.bounds.data(),
                            c.tokens / 64),
              IsOk());
  auto w = c.IdentityTower();
  core.SetWeights(w);
  PredictArgs a;
  a.policy = Policy::kLsa;
  a.max_pages = 7;  // 4 beyond sink and tail
  a.hidden = c.q;
  auto lsa = core.Predict("tq", a);
  ASSERT_THAT(lsa.status(), IsOk());
  a.policy = Policy::kModelQuery;
  a.query = c.q;
  auto share = core.Predict("tq", a);
  a.policy = Policy::kQuest;
  auto bound = core.Predict("tq", a);
  ASSERT_THAT(share.status(), IsOk());
  ASSERT_THAT(bound.status(), IsOk());
  const std::vector<uint64_t> got = Pages(*lsa);
  ASSERT_EQ(got.size(), 7u);
  for (uint64_t p : {0, 9, 21, 38, 39})
    EXPECT_TRUE(std::count(got.begin(), got.end(), p)) << "page " << p;
  // The two pages beside the needles: one from each ranking (the next best of each).
  std::vector<uint64_t> extra;
  for (uint64_t p : got)
    if (p != 0 && p != 9 && p != 21 && p < 38) extra.push_back(p);
  ASSERT_EQ(extra.size(), 2u);
  auto in = [](const Prediction& pr, uint64_t p) {
    for (const auto& x : pr.pages)
      if (x.page == p) return true;
    return false;
  };
  EXPECT_TRUE(in(*share, extra[0]) || in(*share, extra[1])) << "one from the tower's ranking";
  EXPECT_TRUE(in(*bound, extra[0]) || in(*bound, extra[1])) << "one from the bound's ranking";
}

}  // namespace
}  // namespace fm::indexer

namespace fm::indexer {
namespace {

// LoadWeights says in the log which set it loaded (path, hash, shape) and which it replaced.
TEST(IndexerCore, LoadingWeightsLogsTheSetItLoadedAndTheOneItReplaced) {
  auto s = MakeSession();
  const std::string a = ::testing::TempDir() + "/wa.safetensors";
  const std::string b = ::testing::TempDir() + "/wb.safetensors";
  ASSERT_THAT(RandomWeights(s->spec(), 8, 5)->Save(a), IsOk());
  ASSERT_THAT(RandomWeights(s->spec(), 8, 6)->Save(b), IsOk());
  IndexerCore core;
  uint64_t ha = 0, hb = 0;
  ::testing::internal::CaptureStderr();
  ASSERT_THAT(core.LoadWeights(a, &ha), IsOk());
  ASSERT_THAT(core.LoadWeights(b, &hb), IsOk());
  const std::string log = ::testing::internal::GetCapturedStderr();
  char hex_a[17], hex_b[17];
  std::snprintf(hex_a, sizeof(hex_a), "%016llx", static_cast<unsigned long long>(ha));
  std::snprintf(hex_b, sizeof(hex_b), "%016llx", static_cast<unsigned long long>(hb));
  EXPECT_NE(log.find("loaded weights " + a + " (hash " + hex_a +
                     "; chunk tower, 1 index layers x 4 heads x 64 dims, hidden 256, rank 8): a new shape, 1 "
                     "sets held"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("loaded weights " + b + " (hash " + hex_b), std::string::npos) << log;
  EXPECT_NE(log.find(std::string("replaced the set of hash ") + hex_a), std::string::npos) << log;
}

}  // namespace
}  // namespace fm::indexer
