// Parity of the C++ indexer with the PyTorch trainer (DESIGN §3): both score the same trace
// with the shipped checkpoint; Pearson >= 0.999 on the logits and identical threshold
// decisions on >= 99.9 % of chunks. Runs trainer/score_trace.py with Debian's python3.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <algorithm>

#include "common/safetensors.h"
#include "common/status_matchers.h"
#include "services/indexer/indexer_core.h"
#include "tests/process_util.h"
#include "workload/trace.h"

namespace fm {
namespace {
using ::fm::testing::IsOk;

TEST(TrainerParity, CppAndPyTorchScoreTheSameTraceAlike) {
  const std::string dir = MakeTempDir("fm_parity");
  const std::string weights = std::string(FM_SOURCE_DIR) + "/models/lsa-bench.safetensors";
  auto w = indexer::Weights::Load(weights);
  ASSERT_THAT(w, IsOk());
  workload::SessionConfig c;
  c.spec = *PresetSpec("bench");
  c.seed = 424242;  // not a training seed
  c.prefill_tokens = 16384;
  c.steps = 128;
  auto s = workload::Session::Generate(c);
  ASSERT_THAT(s, IsOk());
  const std::string trace = dir + "/trace.safetensors", out = dir + "/logits.safetensors";
  ASSERT_THAT(workload::WriteTrace(**s, trace), IsOk());
  const uint32_t cycle = 1;
  const std::string cmd = "/usr/bin/python3 " + std::string(FM_SOURCE_DIR) +
                          "/trainer/score_trace.py --trace " + trace + " --weights " + weights +
                          " --cycle " + std::to_string(cycle) + " --out " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto py = SafetensorsFile::Open(out);
  ASSERT_THAT(py, IsOk());
  const ModelSpec& sp = c.spec;
  const uint64_t n = (*s)->indexed_chunks(cycle * c.knobs.tau);
  auto pyl = (*py)->GetFloats("logits", {sp.index_layers, int64_t(n)});
  ASSERT_THAT(pyl, IsOk());
  // The C++ side: fm-indexer's own path (tower, fp16 scan where the CPU has it).
  indexer::IndexerCore core;
  core.SetWeights(*w);
  const auto& is = (*w)->shape;
  std::vector<float> q(size_t{is.layers} * is.heads * is.dim), hw(size_t{is.layers} * is.heads);
  const float* h = (*s)->hidden(cycle * c.knobs.tau);
  for (uint32_t l = 0; l < is.layers; ++l)
    kernels::IndexerQuery(
        is, {(*w)->w_a[l].data(), (*w)->g[l].data(), (*w)->w_b[l].data(), (*w)->w_w[l].data()}, h,
        (*s)->tokens_at(cycle * c.knobs.tau), q.data() + l * is.heads * is.dim,
        hw.data() + l * is.heads);
  std::vector<std::vector<uint8_t>> blocks;
  std::vector<const uint8_t*> ptrs;
  for (uint32_t l = 0; l < is.layers; ++l) {
    blocks.emplace_back(kernels::KeyBlocksBytes(is.dim, n), 0);
    kernels::PackIndexKeys(is.dim, (*s)->index_keys(l).data(), 0, n, blocks.back().data());
    ptrs.push_back(blocks.back().data());
  }
  std::vector<float> cl(size_t{is.layers} * n);
  kernels::ScoreKeyBlocks(is, q.data(), hw.data(), ptrs.data(), n, kernels::ScoreMath::kFast,
                          cl.data());
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  for (size_t i = 0; i < cl.size(); ++i) {
    const double x = cl[i], y = (*pyl)[i];
    sx += x, sy += y, sxx += x * x, syy += y * y, sxy += x * y;
  }
  const double m = cl.size();
  const double pearson = (sxy - sx * sy / m) / std::sqrt((sxx - sx * sx / m) * (syy - sy * sy / m));
  uint64_t same = 0, kept = 0;
  for (uint64_t j = 0; j < n; ++j) {
    float a = -1e30f, b = -1e30f;
    for (uint32_t l = 0; l < is.layers; ++l)
      a = std::max(a, cl[l * n + j]), b = std::max(b, (*pyl)[l * n + j]);
    same += (a > 0) == (b > 0);  // sigmoid > 0.5
    kept += a > 0;
  }
  std::printf(
      "parity over %llu chunks x %u layers: Pearson %.6f, threshold agreement %.4f %%, %llu kept\n",
      static_cast<unsigned long long>(n), is.layers, pearson, 100.0 * same / n,
      static_cast<unsigned long long>(kept));
  EXPECT_GE(pearson, 0.999);
  EXPECT_GE(double(same) / n, 0.999);
  EXPECT_GT(kept, 0u);  // the decisions are not trivially all-negative ...
  EXPECT_LT(kept, n);   // ... nor all-positive
  std::filesystem::remove_all(dir);
}


// The token_query tower (own models; trainer/token_query.py): the trainer's page scores and
// fm-indexer's lsa scores of one cycle agree page by page (|diff| <= 1e-4 of a head's
// attention share) and keep the same top pages; the history's open page (no index keys
// yet) scores 0. The trace is the generator's on a spec in
// the own-model layout (index keys of chunk_tokens x kv_heads x head_dim, hidden the index
// layer's query); the tower's weights are random.
TEST(TrainerParity, TokenQueryTowerScoresPagesAlikeInCppAndPyTorch) {
  const std::string dir = MakeTempDir("fm_parity_tq");
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  ModelSpec& sp = c.spec;
  sp.index_layers = 2;  // both layers: the tower's per-layer blocks are compared too
  sp.index_dim = sp.chunk_tokens * sp.kv_heads * sp.head_dim;
  sp.index_heads = sp.q_heads;
  sp.hidden_dim = sp.index_layers * sp.q_heads * sp.head_dim;
  c.seed = 424243;
  c.prefill_tokens = 4096;
  c.steps = 16;
  auto s = workload::Session::Generate(c);
  ASSERT_THAT(s, IsOk());
  const std::string trace = dir + "/trace.safetensors", out = dir + "/scores.safetensors",
                    weights = dir + "/tq.safetensors";
  ASSERT_THAT(workload::WriteTrace(**s, trace), IsOk());
  indexer::Weights w;
  w.tower = indexer::Tower::kTokenQuery;
  w.shape.layers = sp.index_layers;
  w.shape.heads = sp.q_heads;
  w.shape.dim = sp.index_dim;
  w.shape.hidden = sp.hidden_dim;
  w.head_dim = sp.head_dim;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const uint32_t o = sp.q_heads * sp.head_dim;
  for (uint32_t l = 0; l < sp.index_layers; ++l) {
    w.w_q.emplace_back(size_t{o} * sp.hidden_dim);
    for (float& x : w.w_q.back()) x = nd(rng) * 3.0f / std::sqrt(float(sp.hidden_dim));
    w.b_q.emplace_back(o);
    for (float& x : w.b_q.back()) x = nd(rng) * 0.1f;
  }
  ASSERT_THAT(w.Save(weights), IsOk());
  const uint32_t cycle = 1;
  const std::string cmd = "/usr/bin/python3 " + std::string(FM_SOURCE_DIR) +
                          "/trainer/score_trace.py --trace " + trace + " --weights " + weights +
                          " --cycle " + std::to_string(cycle) + " --out " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const uint64_t step = cycle * c.knobs.tau, n = (*s)->indexed_chunks(step);
  const uint64_t pages = n * sp.chunk_tokens / sp.page_tokens;
  auto py = SafetensorsFile::Open(out);
  ASSERT_THAT(py, IsOk());
  auto pys = (*py)->GetFloats("page_scores", {int64_t(pages)});
  ASSERT_THAT(pys, IsOk());
  indexer::IndexerCore core;
  auto loaded = indexer::Weights::Load(weights);
  ASSERT_THAT(loaded, IsOk());
  core.SetWeights(*loaded);
  std::vector<uint8_t> keys;
  for (uint32_t l = 0; l < sp.index_layers; ++l) {
    const auto& k = (*s)->index_keys(l);
    keys.insert(keys.end(), k.begin(), k.begin() + n * sp.IndexKeyBytes());
  }
  // The history as of the cycle start: its sealed pages' keys and a partial open page.
  ASSERT_THAT(core.Register("tq", sp, keys.data(), n, pages * sp.page_tokens + 17), IsOk());
  indexer::PredictArgs a;
  a.policy = indexer::Policy::kLsa;
  a.hidden.assign((*s)->hidden(step), (*s)->hidden(step) + sp.hidden_dim);
  a.max_pages = static_cast<uint32_t>(pages + 1);
  a.sink = a.tail = 0;
  auto p = core.Predict("tq", a);
  ASSERT_THAT(p, IsOk());
  ASSERT_EQ(p->pages.size(), pages + 1);
  EXPECT_EQ(p->pages[pages].score, 0.0f);
  double worst = 0;
  std::vector<std::pair<float, uint64_t>> cpp_rank, py_rank;
  for (uint64_t i = 0; i < pages; ++i) {
    worst = std::max(worst, std::abs(double(p->pages[i].score) - (*pys)[i]));
    cpp_rank.push_back({-p->pages[i].score, i});
    py_rank.push_back({-(*pys)[i], i});
  }
  std::sort(cpp_rank.begin(), cpp_rank.end());
  std::sort(py_rank.begin(), py_rank.end());
  std::printf("token_query parity over %llu pages: max |diff| %.2e, best page %llu (%.4f)\n",
              static_cast<unsigned long long>(pages), worst,
              static_cast<unsigned long long>(cpp_rank[0].second), -cpp_rank[0].first);
  EXPECT_LE(worst, 1e-4);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(cpp_rank[i].second, py_rank[i].second) << "rank " << i;
  EXPECT_GT(-cpp_rank[0].first, -cpp_rank[pages - 1].first);  // the scores differ
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fm
