#include "flashmemory/kernels/quest.h"

#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <cstring>
#include <random>

#include "kernels/testing/random_pages.h"

namespace fm::kernels {
namespace {

using testing::RandomPages;

TEST(Quest, BoundsAndScoresMatchReferenceOnEveryTarget) {
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (ElemType dt : {ElemType::kF32, ElemType::kF16, ElemType::kBf16}) {
      AttentionShape s{2, 8, 2, 80, 16, dt, 0};
      const uint32_t pages = 37;
      auto data = RandomPages(s, pages, static_cast<uint64_t>(dt));
      const size_t nb = QuestBoundsFloats(s);
      std::vector<float> b(pages * nb), rb(pages * nb);
      for (uint32_t p = 0; p < pages; ++p) {
        uint32_t valid = p == pages - 1 ? 5 : 16;
        ASSERT_EQ(QuestBounds(s, data.data() + p * s.PageBytes(), valid, b.data() + p * nb),
                  KernelStatus::kOk);
        ASSERT_EQ(
            reference::QuestBounds(s, data.data() + p * s.PageBytes(), valid, rb.data() + p * nb),
            KernelStatus::kOk);
      }
      ASSERT_EQ(b, rb) << hwy::TargetName(target);  // min and max are exact
      std::vector<float> q(s.q_heads * s.head_dim);
      std::mt19937 rng(5);
      std::normal_distribution<float> nd;
      for (float& x : q) x = nd(rng);
      std::vector<float> sc(pages), rsc(pages);
      ASSERT_EQ(QuestPageScores(s, 1, q.data(), b.data(), pages, sc.data()), KernelStatus::kOk);
      ASSERT_EQ(reference::QuestPageScores(s, 1, q.data(), rb.data(), pages, rsc.data()),
                KernelStatus::kOk);
      for (uint32_t p = 0; p < pages; ++p)
        ASSERT_NEAR(sc[p], rsc[p], 1e-4f * (1 + std::abs(rsc[p]))) << p;
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

// The bound holds: no token of a page scores above its page's bound.
TEST(Quest, UpperBoundHoldsForEveryToken) {
  AttentionShape s{1, 4, 1, 64, 32, ElemType::kF32, 0};
  auto data = RandomPages(s, 20, 3);
  std::vector<float> b(20 * QuestBoundsFloats(s)), sc(20), q(4 * 64);
  for (uint32_t p = 0; p < 20; ++p)
    ASSERT_EQ(
        QuestBounds(s, data.data() + p * s.PageBytes(), 32, b.data() + p * QuestBoundsFloats(s)),
        KernelStatus::kOk);
  std::mt19937 rng(8);
  std::normal_distribution<float> nd;
  for (float& x : q) x = nd(rng);
  ASSERT_EQ(QuestPageScores(s, 0, q.data(), b.data(), 20, sc.data()), KernelStatus::kOk);
  for (uint32_t p = 0; p < 20; ++p) {
    const float* k = reinterpret_cast<const float*>(data.data() + p * s.PageBytes());
    for (uint32_t h = 0; h < 4; ++h)
      for (uint32_t t = 0; t < 32; ++t) {
        float dot = 0;
        for (uint32_t j = 0; j < 64; ++j) dot += q[h * 64 + j] * k[t * 64 + j];
        EXPECT_LE(dot * s.Scale(), sc[p] + 1e-4f);
      }
  }
  EXPECT_EQ(QuestBounds(s, data.data(), 0, b.data()), KernelStatus::kBadPageIndex);
  EXPECT_EQ(QuestPageScores(s, 1, q.data(), b.data(), 20, sc.data()), KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace fm::kernels
