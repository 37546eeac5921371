#include "flashmemory/kernels/indexer.h"

#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "common/codecs.h"
#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {
namespace {

struct Keys {
  IndexerShape s;
  std::vector<std::vector<uint8_t>> data;
  std::vector<const uint8_t*> ptrs;
  Keys(const IndexerShape& shape, uint64_t chunks, uint64_t seed) : s(shape) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    std::vector<float> raw(s.dim);
    for (uint32_t l = 0; l < s.layers; ++l) {
      data.emplace_back(chunks * s.KeyBytes());
      for (uint64_t c = 0; c < chunks; ++c) {
        for (float& x : raw) x = nd(rng) * (1 + c % 5);
        CompressIndexKey(s.dim, raw.data(), data.back().data() + c * s.KeyBytes());
      }
    }
    for (auto& d : data) ptrs.push_back(d.data());
  }
};

std::vector<float> Random(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

TEST(ScoreChunks, Fp8DecodeMatchesTheCodecForEveryCode) {
  IndexerShape s{1, 1, 256};
  // One key holding every code once, scale 0.5; q picks one element (with either sign).
  std::vector<uint8_t> key(s.KeyBytes());
  for (int c = 0; c < 256; ++c) key[c] = static_cast<uint8_t>(c);
  const float scale = 0.5f;
  std::memcpy(key.data() + 256, &scale, 4);
  const uint8_t* keys[] = {key.data()};
  std::vector<float> q(256), w = {1.0f};
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN codes are never produced by the compressor
    const float want = Fp8E4m3ToFloat(static_cast<uint8_t>(c)) * scale;
    std::fill(q.begin(), q.end(), 0.0f);
    q[c] = want >= 0 ? 1.0f : -1.0f;
    float logit = -1;
    ASSERT_EQ(ScoreChunks(s, q.data(), w.data(), keys, 1, &logit), KernelStatus::kOk);
    ASSERT_EQ(logit, std::abs(want)) << "code " << c;
  }
}

TEST(ScoreChunks, MatchesReferenceOnEveryTarget) {
  const std::tuple<uint32_t, uint32_t, uint32_t, uint64_t> cases[] = {
      {3, 16, 128, 5001}, {1, 1, 64, 1}, {2, 3, 256, 7}, {3, 8, 128, 2}, {1, 5, 512, 300}};
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (auto [layers, heads, dim, chunks] : cases) {
      IndexerShape s{layers, heads, dim};
      Keys keys(s, chunks, dim + heads);
      auto q = Random(size_t{layers} * heads * dim, 1);
      auto w = Random(size_t{layers} * heads, 2);
      std::vector<float> got(layers * chunks), want(layers * chunks);
      ASSERT_EQ(ScoreChunks(s, q.data(), w.data(), keys.ptrs.data(), chunks, got.data()),
                KernelStatus::kOk);
      ASSERT_EQ(
          reference::ScoreChunks(s, q.data(), w.data(), keys.ptrs.data(), chunks, want.data()),
          KernelStatus::kOk);
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], want[i], 1e-3f * (1 + std::abs(want[i])))
            << hwy::TargetName(target) << " Hi=" << heads << " di=" << dim << " i=" << i;
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Keys in the scan layout, packed from Keys in two uneven pieces.
std::vector<std::vector<uint8_t>> Pack(const Keys& keys, uint64_t chunks,
                                       std::vector<const uint8_t*>* ptrs) {
  std::vector<std::vector<uint8_t>> out;
  const uint64_t first = chunks / 3;
  for (const auto& d : keys.data) {
    out.emplace_back(KeyBlocksBytes(keys.s.dim, chunks), 0);
    PackIndexKeys(keys.s.dim, d.data(), 0, first, out.back().data());
    PackIndexKeys(keys.s.dim, d.data() + first * keys.s.KeyBytes(), first, chunks - first,
                  out.back().data());
  }
  ptrs->clear();
  for (auto& d : out) ptrs->push_back(d.data());
  return out;
}

TEST(PackIndexKeys, RoundTripsAndPadsWithZeroScales) {
  IndexerShape s{1, 1, 64};
  const uint64_t chunks = 45;
  Keys keys(s, chunks, 3);
  std::vector<const uint8_t*> ptrs;
  auto blocks = Pack(keys, chunks, &ptrs);
  ASSERT_EQ(blocks[0].size(), 2 * (64 + 4) * 32u);
  std::vector<uint8_t> key(s.KeyBytes());
  for (uint64_t c = 0; c < chunks; ++c) {
    UnpackIndexKey(s.dim, ptrs[0], c, key.data());
    ASSERT_EQ(0, std::memcmp(key.data(), keys.data[0].data() + c * s.KeyBytes(), s.KeyBytes()))
        << c;
  }
  UnpackIndexKey(s.dim, ptrs[0], chunks, key.data());
  float scale = -1;
  std::memcpy(&scale, key.data() + 64, 4);
  EXPECT_EQ(scale, 0.0f);
}

// Every path decodes fp8 exactly, but for the int16 scan (avx512vnni), which rounds 16 v to
// an integer: exact for |v| >= 1/2, within 1/32 of the key's scale below.
TEST(ScoreKeyBlocks, Fp8DecodeIsExactOnBothPaths) {
  IndexerShape s{1, 1, 256};
  std::vector<uint8_t> key(s.KeyBytes());
  for (int c = 0; c < 256; ++c) key[c] = static_cast<uint8_t>(c);
  const float scale = 0.5f;
  std::memcpy(key.data() + 256, &scale, 4);
  std::vector<uint8_t> blocks(KeyBlocksBytes(256, 1), 0);
  PackIndexKeys(256, key.data(), 0, 1, blocks.data());
  const uint8_t* ptrs[] = {blocks.data()};
  std::vector<float> q(256), w = {1.0f};
  for (ScoreMath math : {ScoreMath::kExact, ScoreMath::kFast}) {
    for (int c = 0; c < 256; ++c) {
      if ((c & 0x7f) == 0x7f) continue;  // NaN codes
      const float want = Fp8E4m3ToFloat(static_cast<uint8_t>(c)) * scale;
      std::fill(q.begin(), q.end(), 0.0f);
      q[c] = want >= 0 ? 1.0f : -1.0f;
      float logit = -1;
      ASSERT_EQ(ScoreKeyBlocks(s, q.data(), w.data(), ptrs, 1, math, &logit), KernelStatus::kOk);
      if (ScoreKeyBlocksPath(math) == "avx512vnni" && std::abs(want) < 0.5f * scale)
        ASSERT_NEAR(logit, std::abs(want), scale / 32) << " code " << c;
      else
        ASSERT_EQ(logit, std::abs(want)) << ScoreKeyBlocksPath(math) << " code " << c;
    }
  }
}

// Largest |got - want| relative to the scale of the sum, sum_h |w_h| |q_h| |k| (|k| of the
// chunk's decoded key), over every layer and chunk.
double WorstRelativeError(const IndexerShape& s, const Keys& keys, const std::vector<float>& q,
                          const std::vector<float>& w, const std::vector<float>& got,
                          const std::vector<float>& want, uint64_t chunks) {
  double worst = 0;
  for (uint32_t l = 0; l < s.layers; ++l) {
    double qw = 0;
    for (uint32_t h = 0; h < s.heads; ++h) {
      double qq = 0;
      for (uint32_t j = 0; j < s.dim; ++j)
        qq += double(q[(l * s.heads + h) * s.dim + j]) * q[(l * s.heads + h) * s.dim + j];
      qw += std::abs(w[l * s.heads + h]) * std::sqrt(qq);
    }
    for (uint64_t c = 0; c < chunks; ++c) {
      const uint8_t* key = keys.data[l].data() + c * s.KeyBytes();
      float sc;
      std::memcpy(&sc, key + s.dim, 4);
      double kk = 0;
      for (uint32_t j = 0; j < s.dim; ++j) kk += std::pow(double(Fp8E4m3ToFloat(key[j])) * sc, 2);
      const size_t i = size_t{l} * chunks + c;
      worst = std::max(worst, std::abs(double(got[i]) - want[i]) / (qw * std::sqrt(kk) + 1e-30));
    }
  }
  return worst;
}

TEST(DecodeKeyRowsVbmi, EveryCodeInEveryRowAndLaneIsTheCodecsValueTimes2ToTheMinus8) {
  if (!VbmiScoringAvailable()) GTEST_SKIP() << "no AVX512-VBMI";
  // 8 rows of 32 keys: code (row * 32 + lane) * 37 mod 256 puts every code in every lane
  // position class and both rows of a pair.
  constexpr uint32_t kRows = 8;
  alignas(64) uint8_t rows[kRows * kKeyBlock];
  alignas(64) float out[kRows * kKeyBlock];
  for (uint32_t i = 0; i < kRows * kKeyBlock; ++i) rows[i] = static_cast<uint8_t>(i * 37 % 256);
  DecodeKeyRowsVbmi(rows, kRows, out);
  for (uint32_t i = 0; i < kRows * kKeyBlock; ++i) {
    const uint8_t c = rows[i];
    // The NaN codes read as +-480, as through fp16 (exponent 15 is finite there).
    const float want = (c & 0x7f) == 0x7f ? (c & 0x80 ? -480.0f : 480.0f) : Fp8E4m3ToFloat(c);
    ASSERT_EQ(out[i], want / 256) << "row " << i / kKeyBlock << " lane " << i % kKeyBlock
                                  << " code " << int{c};
  }
}

TEST(ScoreKeyBlocks, MatchesReferenceOnEveryTargetAndPath) {
  const std::tuple<uint32_t, uint32_t, uint32_t, uint64_t> cases[] = {
      {3, 16, 128, 5001}, {1, 1, 64, 1},   {2, 3, 256, 77},  {3, 8, 128, 32},
      {1, 5, 512, 300},   {1, 20, 64, 65}, {2, 17, 128, 33}, {1, 4, 64, 31}};
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (auto [layers, heads, dim, chunks] : cases) {
      IndexerShape s{layers, heads, dim};
      Keys keys(s, chunks, dim + heads);
      std::vector<const uint8_t*> ptrs;
      auto blocks = Pack(keys, chunks, &ptrs);
      auto q = Random(size_t{layers} * heads * dim, 1, 0.05f);
      auto w = Random(size_t{layers} * heads, 2);
      std::vector<float> want(layers * chunks);
      ASSERT_EQ(
          reference::ScoreChunks(s, q.data(), w.data(), keys.ptrs.data(), chunks, want.data()),
          KernelStatus::kOk);
      for (ScoreMath math : {ScoreMath::kExact, ScoreMath::kFast}) {
        std::vector<float> got(layers * chunks, -1.0f);
        ASSERT_EQ(ScoreKeyBlocks(s, q.data(), w.data(), ptrs.data(), chunks, math, got.data()),
                  KernelStatus::kOk);
        const double err = WorstRelativeError(s, keys, q, w, got, want, chunks);
        // The fast paths round q (and, in int16, small key values): within 5e-4; the fp32
        // scans differ from the reference only in summation order.
        const std::string path = ScoreKeyBlocksPath(math);
        const bool rounded = path == "avx512fp16" || path == "avx512vnni";
        EXPECT_LT(err, rounded ? 5e-4 : 1e-6)
            << hwy::TargetName(target) << " " << ScoreKeyBlocksPath(math) << " Hi=" << heads
            << " di=" << dim << " chunks=" << chunks;
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

TEST(IndexerQuery, TowerArithmetic) {
  IndexerShape s{1, 2, 64};
  s.hidden = 32;
  s.rank = 16;
  auto wa = Random(16 * 32, 1), g = Random(16, 2), wb = Random(2 * 64 * 16, 3),
       ww = Random(2 * 32, 4), h = Random(32, 5);
  IndexerLayerWeights wts{wa.data(), g.data(), wb.data(), ww.data()};
  std::vector<float> q0(128), w0(2), q7(128), w7(2);
  ASSERT_EQ(IndexerQuery(s, wts, h.data(), 0, q0.data(), w0.data()), KernelStatus::kOk);
  ASSERT_EQ(IndexerQuery(s, wts, h.data(), 7, q7.data(), w7.data()), KernelStatus::kOk);
  // By hand: RMSNorm, W_b, then (position 0: no rotation) the normalized Hadamard.
  std::vector<float> a(16), qv(128);
  double ss = 0;
  for (int r = 0; r < 16; ++r) {
    for (int i = 0; i < 32; ++i) a[r] += wa[r * 32 + i] * h[i];
    ss += a[r] * a[r];
  }
  for (int r = 0; r < 16; ++r) a[r] = a[r] / std::sqrt(ss / 16 + 1e-6) * g[r];
  for (int o = 0; o < 128; ++o)
    for (int r = 0; r < 16; ++r) qv[o] += wb[o * 16 + r] * a[r];
  for (int hh = 0; hh < 2; ++hh)
    for (int j = 0; j < 64; ++j) {
      double acc = 0;
      for (int i = 0; i < 64; ++i)
        acc += (__builtin_popcount(i & j) % 2 ? -1 : 1) * qv[hh * 64 + i];
      EXPECT_NEAR(q0[hh * 64 + j], acc / 8, 1e-4) << hh << " " << j;
    }
  // A rotation and an orthonormal transform keep each head's norm; w ignores the position.
  for (int hh = 0; hh < 2; ++hh) {
    double n0 = 0, n7 = 0;
    for (int j = 0; j < 64; ++j)
      n0 += q0[hh * 64 + j] * q0[hh * 64 + j], n7 += q7[hh * 64 + j] * q7[hh * 64 + j];
    EXPECT_NEAR(n0, n7, 1e-3 * n0);
    double wexp = 0;
    for (int i = 0; i < 32; ++i) wexp += ww[hh * 32 + i] * h[i];
    EXPECT_NEAR(w0[hh], wexp / std::sqrt(64.0 * 2), 1e-5);
    EXPECT_EQ(w0[hh], w7[hh]);
  }
  EXPECT_NE(q0, q7);
  s.hidden = 0;
  EXPECT_EQ(IndexerQuery(s, wts, h.data(), 0, q0.data(), w0.data()), KernelStatus::kInvalidShape);
}

TEST(CompressIndexKey, RoundTripsWithinFp8Precision) {
  auto k = Random(128, 9, 3.0f);
  std::vector<uint8_t> out(132);
  CompressIndexKey(128, k.data(), out.data());
  float scale;
  std::memcpy(&scale, out.data() + 128, 4);
  float amax = 0;
  for (float x : k) amax = std::max(amax, std::abs(x));
  EXPECT_FLOAT_EQ(scale, amax / 448.0f);
  for (int j = 0; j < 128; ++j)
    EXPECT_NEAR(Fp8E4m3ToFloat(out[j]) * scale, k[j], std::abs(k[j]) / 16 + scale * 0.002f);
  std::vector<float> zero(64, 0.0f);
  CompressIndexKey(64, zero.data(), out.data());
  std::memcpy(&scale, out.data() + 64, 4);
  EXPECT_EQ(scale, 1.0f);
}

TEST(SelectPages, SinkTailAndTopPagesByKeptChunks) {
  // 8 pages of 4 chunks (page 16 tokens, chunk 4). Two layers; max combine.
  const uint64_t chunks = 30;  // the last page is partial (2 of 4 chunks)
  std::vector<float> logits(2 * chunks, -10.0f);
  auto keep = [&](uint64_t c, uint32_t layer, float v) { logits[layer * chunks + c] = v; };
  keep(4 * 3 + 0, 0, 5), keep(4 * 3 + 1, 1, 5), keep(4 * 3 + 2, 0, 5);  // page 3: 3 kept
  keep(4 * 5 + 0, 1, 5), keep(4 * 5 + 3, 1, 5);                         // page 5: 2 kept
  keep(4 * 2 + 1, 0, 5), keep(4 * 2 + 2, 0, -0.1f);  // page 2: 1 kept, best 0.475
  keep(4 * 4 + 0, 1, 3);                             // page 4: 1 kept, best 0.95
  SelectParams p;
  p.chunk_tokens = 4;
  p.page_tokens = 16;
  p.total_pages = 8;
  p.kmax = 3;
  std::vector<ScoredPageOut> out;
  ASSERT_EQ(SelectPages(2, logits.data(), chunks, p, &out), KernelStatus::kOk);
  std::vector<uint64_t> pages;
  for (auto& o : out) pages.push_back(o.page);
  // Sink 0, tail 6 and 7, then pages 3 (3 kept), 5 (2 kept), and of the one-kept pages 2 and
  // 4 the one with the better chunk: page 2's best is sigmoid(5) > page 4's sigmoid(3).
  EXPECT_EQ(pages, (std::vector<uint64_t>{0, 2, 3, 5, 6, 7}));
  EXPECT_TRUE(std::isinf(out[0].score));
  EXPECT_EQ(out[2].score, 3.0f);
  p.kmax = 100;  // more than there are candidates: every page
  ASSERT_EQ(SelectPages(2, logits.data(), chunks, p, &out), KernelStatus::kOk);
  EXPECT_EQ(out.size(), 8u);
  p.page_tokens = 10;  // not a multiple of the chunk
  EXPECT_EQ(SelectPages(2, logits.data(), chunks, p, &out), KernelStatus::kInvalidShape);
}

// Selection by the definition: per chunk the max over layers of the sigmoid, kept above
// theta, pages by kept count then best chunk (then the newer page).
std::vector<uint64_t> SelectByDefinition(uint32_t layers, const std::vector<float>& logits,
                                         uint64_t chunks, const SelectParams& p) {
  const uint64_t per_page = p.page_tokens / p.chunk_tokens;
  std::vector<uint32_t> kept(p.total_pages, 0);
  std::vector<float> best(p.total_pages, 0.0f);
  for (uint64_t c = 0; c < chunks; ++c) {
    float sc = 0;
    for (uint32_t l = 0; l < layers; ++l)
      sc = std::max(sc, 1.0f / (1.0f + std::exp(-logits[l * chunks + c])));
    kept[c / per_page] += sc > p.theta;
    best[c / per_page] = std::max(best[c / per_page], sc);
  }
  std::vector<uint64_t> mid;
  for (uint64_t pg = p.sink; pg < p.total_pages - p.tail; ++pg) mid.push_back(pg);
  std::sort(mid.begin(), mid.end(), [&](uint64_t a, uint64_t b) {
    if (kept[a] != kept[b]) return kept[a] > kept[b];
    if (best[a] != best[b]) return best[a] > best[b];
    return a > b;
  });
  mid.resize(std::min<size_t>(mid.size(), p.kmax));
  for (uint64_t pg = 0; pg < p.sink; ++pg) mid.push_back(pg);
  for (uint64_t pg = p.total_pages - p.tail; pg < p.total_pages; ++pg) mid.push_back(pg);
  std::sort(mid.begin(), mid.end());
  return mid;
}

TEST(SelectPages, EqualsTheDefinitionAtEveryThreshold) {
  // Logits around each threshold's boundary (and saturated ones): the kept test on the
  // largest logit and one sigmoid per page give the definition's selection exactly.
  std::mt19937 rng(5);
  const uint32_t layers = 3;
  const uint64_t chunks = 16 * 300 - 5;  // a partial last page
  for (float theta : {0.5f, 0.3f, 0.9f, 0.999f, 0.0f}) {
    const float t = std::log(theta / (1 - theta));
    std::normal_distribution<float> near(std::isfinite(t) ? t : -90.0f, 0.01f), wide(0, 20);
    std::vector<float> logits(layers * chunks);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = i % 3 ? near(rng) : wide(rng);
    // And the floats right at the boundary: t and its neighbours, a few ulps each way.
    if (std::isfinite(t)) {
      std::vector<float> edge = {t};
      for (int k = 0; k < 3; ++k) {
        edge.push_back(std::nextafter(edge[2 * k], 1e9f));
        edge.push_back(std::nextafter(edge[k == 0 ? 0 : 2 * k - 1], -1e9f));
      }
      for (size_t i = 0; i < logits.size(); i += 7) logits[i] = edge[(i / 7) % edge.size()];
    }
    SelectParams p;
    p.chunk_tokens = 4;
    p.page_tokens = 64;
    p.total_pages = 300;
    p.kmax = 37;
    p.theta = theta;
    std::vector<ScoredPageOut> out;
    ASSERT_EQ(SelectPages(layers, logits.data(), chunks, p, &out), KernelStatus::kOk);
    std::vector<uint64_t> pages;
    for (const auto& o : out) pages.push_back(o.page);
    EXPECT_EQ(pages, SelectByDefinition(layers, logits, chunks, p)) << "theta " << theta;
  }
}

TEST(SelectPages, ABestChunkShareKeepsALoneSharpChunk) {
  // 8 pages of 4 chunks, one layer: page 1 holds one sharply wanted chunk (a needle), pages
  // 2, 3 and 5 several mildly wanted ones.
  const uint64_t chunks = 32;
  std::vector<float> logits(chunks, -10.0f);
  logits[4 * 1 + 2] = 8;
  for (uint64_t c : {8, 9, 12, 13, 14, 20, 21}) logits[c] = 1;
  SelectParams p;
  p.chunk_tokens = 4;
  p.page_tokens = 16;
  p.total_pages = 8;
  p.kmax = 3;
  auto picked = [&] {
    std::vector<ScoredPageOut> out;
    EXPECT_EQ(SelectPages(1, logits.data(), chunks, p, &out), KernelStatus::kOk);
    std::vector<uint64_t> pages;
    for (auto& o : out) pages.push_back(o.page);
    return pages;
  };
  // Kept count: 3 (3 kept), then 5 and 2 (2 each; the newer first); the needle's page loses.
  EXPECT_EQ(picked(), (std::vector<uint64_t>{0, 2, 3, 5, 6, 7}));
  p.best_share = 0.34f;  // one of the three by best chunk: the needle's page, then 3 and 5
  EXPECT_EQ(picked(), (std::vector<uint64_t>{0, 1, 3, 5, 6, 7}));
  {
    // The quota's page scores above every kept count (4 chunks per page + sigmoid(8)), so a
    // worker fetches it first; the others score their kept counts.
    std::vector<ScoredPageOut> out;
    ASSERT_EQ(SelectPages(1, logits.data(), chunks, p, &out), KernelStatus::kOk);
    EXPECT_FLOAT_EQ(out[1].score, 4.0f + 1.0f / (1.0f + std::exp(-8.0f)));
    EXPECT_EQ(out[2].score, 3.0f);
    EXPECT_EQ(out[3].score, 2.0f);
  }
  p.best_share = 1.0f;  // all by best chunk: 1 (sigmoid 8), then 3 (3 kept), then 5
  EXPECT_EQ(picked(), (std::vector<uint64_t>{0, 1, 3, 5, 6, 7}));
}

}  // namespace
}  // namespace fm::kernels

namespace fm::kernels {
namespace {

// The model's own query against keys that hold the model's own K: every (head, token) logit
// equals scale * q_h . k_{t, group(h)} of the stored (fp8-rounded) key, over a history that
// ends inside a block, for GQA groups of 1, 2 and 4.
TEST(TokenKeyLogits, EqualsTheModelsLogitOfEveryTokenOfTheStoredKeys) {
  for (uint32_t kv : {1u, 2u, 4u}) {
    TokenKeyShape s;
    s.tokens = 4;
    s.kv_heads = kv;
    s.q_heads = 4;
    s.head_dim = 32;
    s.scale = 0.17f;
    const uint32_t dim = s.dim();
    const uint64_t chunks = 70;
    std::vector<uint8_t> stored(chunks * (dim + 4));
    for (uint64_t c = 0; c < chunks; ++c) {
      std::vector<float> raw = Random(dim, 100 + c, 1.0f + c % 3);
      CompressIndexKey(dim, raw.data(), stored.data() + c * (dim + 4));
    }
    std::vector<uint8_t> blocks(KeyBlocksBytes(dim, chunks));
    PackIndexKeys(dim, stored.data(), 0, chunks, blocks.data());
    const std::vector<float> q = Random(size_t{s.q_heads} * s.head_dim, 7);
    std::vector<float> logits(size_t{s.q_heads} * chunks * s.tokens, -1.0f);
    ASSERT_EQ(TokenKeyLogits(s, dim, q.data(), blocks.data(), chunks, logits.data()),
              KernelStatus::kOk);
    for (uint32_t h = 0; h < s.q_heads; ++h) {
      const uint32_t g = h / (s.q_heads / kv);
      for (uint64_t c = 0; c < chunks; ++c) {
        const uint8_t* key = stored.data() + c * (dim + 4);
        float scale;
        std::memcpy(&scale, key + dim, 4);
        for (uint32_t t = 0; t < s.tokens; ++t) {
          double want = 0;
          for (uint32_t i = 0; i < s.head_dim; ++i)
            want += double(q[h * s.head_dim + i]) *
                    Fp8E4m3ToFloat(key[(t * kv + g) * s.head_dim + i]) * scale;
          want *= s.scale;
          EXPECT_NEAR(logits[(h * chunks + c) * s.tokens + t], want, 1e-4 * (1 + std::abs(want)))
              << "kv " << kv << " head " << h << " chunk " << c << " token " << t;
        }
      }
    }
  }
  TokenKeyShape bad;
  bad.tokens = 4;
  bad.kv_heads = 3;
  bad.q_heads = 4;
  bad.head_dim = 32;
  std::vector<float> out(16);
  EXPECT_EQ(TokenKeyLogits(bad, 384, out.data(), nullptr, 0, out.data()),
            KernelStatus::kInvalidShape);
  bad.kv_heads = 2;
  EXPECT_EQ(TokenKeyLogits(bad, 128, out.data(), nullptr, 0, out.data()),
            KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace fm::kernels
