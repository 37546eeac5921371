#include "services/decode/miss_sketch.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "flashmemory/kernels/indexer.h"

namespace fm::decode {
namespace {

constexpr float kNoMargin = -std::numeric_limits<float>::infinity();

ModelSpec OwnKeySpec() {
  ModelSpec sp;
  sp.name = "own";
  sp.layers = 1;
  sp.q_heads = 4;
  sp.kv_heads = 2;
  sp.head_dim = 32;
  sp.index_layers = 1;
  sp.index_heads = 4;
  sp.index_dim = 4 * 2 * 32;
  sp.chunk_tokens = 4;
  EXPECT_TRUE(sp.Validate().ok());
  return sp;
}

// Stored index keys ([chunk][token][kv][d], fp8 + scale) of `pages` pages of keys drawn as
// mean + (a rank-`rank` mix) + noise; rank 0 = isotropic Gaussian keys.
std::vector<uint8_t> Keys(const ModelSpec& sp, uint64_t pages, uint32_t rank, float noise,
                          uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const uint32_t d = sp.head_dim, hkv = sp.kv_heads;
  std::vector<float> mean(hkv * d), dirs(hkv * std::max(rank, 1u) * d);
  for (float& x : mean) x = nd(rng) * 0.5f;
  for (float& x : dirs) x = nd(rng) * 0.4f;
  const uint64_t tokens = pages * sp.page_tokens;
  std::vector<float> k(tokens * hkv * d);
  for (uint64_t t = 0; t < tokens; ++t)
    for (uint32_t kv = 0; kv < hkv; ++kv) {
      float* out = k.data() + (t * hkv + kv) * d;
      for (uint32_t a = 0; a < d; ++a) out[a] = mean[kv * d + a] + noise * nd(rng);
      if (rank == 0) {
        for (uint32_t a = 0; a < d; ++a) out[a] += nd(rng) * 0.3f;
        continue;
      }
      for (uint32_t r = 0; r < rank; ++r) {
        const float c = nd(rng);
        for (uint32_t a = 0; a < d; ++a) out[a] += c * dirs[(kv * rank + r) * d + a];
      }
    }
  const uint64_t chunks = tokens / sp.chunk_tokens;
  std::vector<uint8_t> keys(chunks * sp.IndexKeyBytes());
  for (uint64_t c = 0; c < chunks; ++c)
    kernels::CompressIndexKey(sp.index_dim, k.data() + c * sp.index_dim,
                              keys.data() + c * sp.IndexKeyBytes());
  return keys;
}

std::vector<float> Query(const ModelSpec& sp, float norm, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(size_t{sp.q_heads} * sp.head_dim);
  for (float& x : q) x = nd(rng) * norm / std::sqrt(float(sp.head_dim));
  return q;
}

const uint8_t* Page(const ModelSpec& sp, const std::vector<uint8_t>& keys, uint64_t p) {
  return keys.data() + p * sp.ChunksPerPage() * sp.IndexKeyBytes();
}

// The largest and mean gap between the sketch's bound and the exact log-mass over pages and
// queries; fails if the bound is ever below the exact score.
void ExpectBounds(const ModelSpec& sp, const KeySketch& sk, const std::vector<uint8_t>& keys,
                  float* max_gap, float* mean_gap) {
  std::vector<float> scratch, lse(sp.q_heads, 0.0f);
  double sum = 0;
  uint64_t n = 0;
  *max_gap = 0;
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = Query(sp, 4.0f + 6.0f * qi, 100 + qi);
    const KeySketch::Query pq = sk.Project(sp, q.data());
    for (uint64_t p = 0; p < sk.pages(); ++p) {
      const float exact = ExactPageMass(sp, q.data(), lse.data(), Page(sp, keys, p), kNoMargin,
                                        &scratch);
      const float bound = sk.PageBound(sp, pq, lse.data(), p, kNoMargin, &scratch);
      ASSERT_GE(bound, exact) << "query " << qi << " page " << p;
      *max_gap = std::max(*max_gap, bound - exact);
      sum += bound - exact;
      ++n;
    }
  }
  *mean_gap = static_cast<float>(sum / n);
}

TEST(KeySketch, BoundsEveryPageFromAboveWhateverTheKeys) {
  const ModelSpec sp = OwnKeySpec();
  for (uint32_t rank : {0u, 4u, 16u}) {
    const std::vector<uint8_t> keys = Keys(sp, 24, rank, 0.05f, 7 + rank);
    KeySketch sk;
    sk.Sync(sp, keys);
    ASSERT_EQ(sk.pages(), 24u);
    float max_gap, mean_gap;
    ExpectBounds(sp, sk, keys, &max_gap, &mean_gap);
    EXPECT_GT(max_gap, 0.0f) << "rank " << rank;
  }
}

// Keys near a rank-4 space (as a trained model's are): the rank-8 sketch's bound is several
// times closer to the exact mass than on isotropic keys.
TEST(KeySketch, IsTightOnKeysNearALowRankSpace) {
  const ModelSpec sp = OwnKeySpec();
  const std::vector<uint8_t> keys = Keys(sp, 24, 4, 0.002f, 11);
  KeySketch sk;
  sk.Sync(sp, keys);
  float max_gap, mean_gap;
  ExpectBounds(sp, sk, keys, &max_gap, &mean_gap);
  // Isotropic keys leave most of each key out of any 8 dimensions: a looser bound.
  const std::vector<uint8_t> iso = Keys(sp, 24, 0, 0.002f, 11);
  KeySketch loose;
  loose.Sync(sp, iso);
  float iso_max, iso_mean;
  ExpectBounds(sp, loose, iso, &iso_max, &iso_mean);
  // What the basis leaves out of low-rank keys is their fp8 rounding (~3 % of each key).
  EXPECT_LT(mean_gap, 0.25f * iso_mean) << "low rank " << mean_gap << " (max " << max_gap
                                        << "), isotropic " << iso_mean << " (max " << iso_max
                                        << ")";
}

// Pages sealed after the basis was made are sketched with it, until their count doubles and
// the basis is made again from all of them; the bound holds throughout. A rank beyond the
// head dimension is the head dimension.
TEST(KeySketch, FollowsTheKeysAsPagesAreSealed) {
  const ModelSpec sp = OwnKeySpec();
  const std::vector<uint8_t> all = Keys(sp, 9, 4, 0.01f, 5);
  const size_t page_bytes = sp.ChunksPerPage() * sp.IndexKeyBytes();
  KeySketch sk(64);
  EXPECT_EQ(sk.rank(), 64u);
  for (uint64_t pages : {0u, 2u, 3u, 4u, 9u}) {
    const std::vector<uint8_t> keys(all.begin(), all.begin() + pages * page_bytes + 7);
    sk.Sync(sp, keys);  // a partial page's keys wait for the page
    EXPECT_EQ(sk.pages(), pages);
    EXPECT_EQ(sk.basis_pages(), pages == 3 ? 2u : pages) << "rebuilt when the pages double";
    if (pages == 0) continue;
    EXPECT_EQ(sk.rank(), sp.head_dim);
    float max_gap, mean_gap;
    ExpectBounds(sp, sk, all, &max_gap, &mean_gap);
    EXPECT_LT(max_gap, 0.05f) << "a full-rank sketch is the keys themselves, at " << pages;
  }
}

// A basis made from kSettledPages pages or more is kept: the pages sealed later are only
// sketched with it, however many.
TEST(KeySketch, KeepsASettledBasis) {
  const ModelSpec sp = OwnKeySpec();
  const uint64_t settled = KeySketch::kSettledPages;
  const std::vector<uint8_t> all = Keys(sp, 2 * settled + 40, 4, 0.01f, 8);
  const size_t page_bytes = sp.ChunksPerPage() * sp.IndexKeyBytes();
  KeySketch sk;
  sk.Sync(sp, std::vector<uint8_t>(all.begin(), all.begin() + settled * page_bytes));
  EXPECT_EQ(sk.basis_pages(), settled);
  sk.Sync(sp, all);
  EXPECT_EQ(sk.pages(), 2 * settled + 40);
  EXPECT_EQ(sk.basis_pages(), settled);
  float max_gap, mean_gap;
  ExpectBounds(sp, sk, all, &max_gap, &mean_gap);
}

// With a margin, a page no head can lift above it answers -inf, as the exact score does.
TEST(KeySketch, AnswersMinusInfinityBelowTheMargin) {
  const ModelSpec sp = OwnKeySpec();
  const std::vector<uint8_t> keys = Keys(sp, 4, 4, 0.01f, 3);
  KeySketch sk;
  sk.Sync(sp, keys);
  const std::vector<float> q = Query(sp, 1.0f, 9);
  const std::vector<float> lse(sp.q_heads, 50.0f);  // a resident mass far above any page
  std::vector<float> scratch;
  const KeySketch::Query pq = sk.Project(sp, q.data());
  for (uint64_t p = 0; p < 4; ++p) {
    EXPECT_EQ(sk.PageBound(sp, pq, lse.data(), p, 0.0f, &scratch), kNoMargin);
    EXPECT_EQ(ExactPageMass(sp, q.data(), lse.data(), Page(sp, keys, p), 0.0f, &scratch),
              kNoMargin);
  }
}

}  // namespace
}  // namespace fm::decode
