// Parity of the C++ indexer with the PyTorch trainer (DESIGN §3): both score the same trace
// with the shipped checkpoint; Pearson >= 0.999 on the logits and identical threshold
// decisions on >= 99.9 % of chunks. Runs trainer/score_trace.py with Debian's python3.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

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

}  // namespace
}  // namespace fm
