#include "flashmemory/kernels/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "kernels/testing/random_pages.h"

namespace fm::kernels {
namespace {

// A pool of `cells` random pages for a shape, optionally with a header gap before each.
struct Pool {
  AttentionShape shape;
  std::vector<uint8_t> bytes;
  PagePool pool;
  Pool(const AttentionShape& s, uint32_t cells, uint64_t seed, size_t offset = 0,
       float spread = 1.0f)
      : shape(s) {
    size_t stride = offset + s.PageBytes() + 64;
    bytes.assign(stride * cells, 0);
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, spread);
    for (uint32_t c = 0; c < cells; ++c)
      testing::FillRandomElems(s.dtype, bytes.data() + c * stride + offset,
                               s.PageBytes() / ElemSize(s.dtype), rng, nd);
    pool = PagePool{bytes.data(), stride, offset, cells};
  }
};

std::vector<float> RandomQ(const AttentionShape& s, uint64_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> q(size_t{s.q_heads} * s.head_dim);
  for (float& x : q) x = nd(rng);
  return q;
}

struct Result {
  std::vector<float> out, lse;
};

Result RunOne(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t layer,
              const std::vector<float>& q, uint32_t threads = 2, uint32_t min_pages = 1) {
  DecodePlan plan;
  std::string why;
  EXPECT_EQ(BuildDecodePlan(s, {pages}, pool, threads, min_pages, &plan, &why), KernelStatus::kOk)
      << why;
  Result r{std::vector<float>(q.size()), std::vector<float>(s.q_heads)};
  DecodeItem item{0, layer, q.data(), r.out.data(), r.lse.data()};
  EXPECT_EQ(RunPagedDecode(plan, pool, &item, 1), KernelStatus::kOk);
  return r;
}

Result RunRef(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t layer,
              const std::vector<float>& q) {
  Result r{std::vector<float>(q.size()), std::vector<float>(s.q_heads)};
  EXPECT_EQ(reference::PagedDecode(s, pool, pages, layer, q.data(), r.out.data(), r.lse.data()),
            KernelStatus::kOk);
  return r;
}

void ExpectClose(const Result& a, const Result& b, float tol, const std::string& what) {
  ASSERT_EQ(a.out.size(), b.out.size());
  float worst = 0;
  for (size_t i = 0; i < a.out.size(); ++i) {
    ASSERT_FALSE(std::isnan(a.out[i])) << what << " NaN at " << i;
    worst = std::max(worst, std::abs(a.out[i] - b.out[i]));
  }
  EXPECT_LE(worst, tol) << what;
  for (size_t h = 0; h < a.lse.size(); ++h)
    EXPECT_NEAR(a.lse[h], b.lse[h], tol * 10) << what << " head " << h;
}

struct PageSet {
  std::vector<uint32_t> cells;
  std::vector<uint16_t> valid;
  PageList list() const {
    return PageList{cells.data(), valid.data(), static_cast<uint32_t>(cells.size())};
  }
};

PageSet Pages(uint32_t n, uint32_t page_tokens, uint32_t last_valid, uint32_t stride = 1) {
  PageSet p;
  for (uint32_t i = 0; i < n; ++i) {
    p.cells.push_back(i * stride);
    p.valid.push_back(i + 1 == n ? last_valid : page_tokens);
  }
  return p;
}

TEST(PagedDecode, MatchesReferenceAcrossHeadDimsHeadsAndDtypes) {
  std::printf("CPU target: %s\n", CpuTargetName());
  const std::pair<uint32_t, uint32_t> heads[] = {{4, 2}, {8, 8}, {12, 2}, {32, 8}};
  const ElemType dtypes[] = {ElemType::kF32, ElemType::kF16, ElemType::kBf16};
  int cases = 0;
  for (uint32_t d = 32; d <= 256; d += 16) {
    for (size_t hi = 0; hi < 4; ++hi) {
      if ((d / 16 + hi) % 2) continue;  // half the cross product keeps the sweep quick
      for (ElemType dt : dtypes) {
        AttentionShape s{2, heads[hi].first, heads[hi].second, d, 16, dt, 0};
        Pool pool(s, 7, d * 31 + hi);
        auto pages = Pages(5, 16, 9, 1);  // four full pages and a partial one
        auto q = RandomQ(s, d + hi);
        for (uint32_t layer = 0; layer < 2; ++layer)
          ExpectClose(RunOne(s, pool.pool, pages.list(), layer, q),
                      RunRef(s, pool.pool, pages.list(), layer, q), 2e-5,
                      "d=" + std::to_string(d) + " Hq=" + std::to_string(s.q_heads) +
                          " dtype=" + std::to_string(static_cast<int>(dt)));
        ++cases;
      }
    }
  }
  EXPECT_GE(cases, 40);
}

TEST(PagedDecode, PageCountsFromOneToThousands) {
  for (uint32_t n : {1u, 2u, 17u, 300u, 2000u}) {
    AttentionShape s{1, 8, 2, 64, 64, ElemType::kBf16, 0};
    Pool pool(s, n, n);
    auto pages = Pages(n, 64, n == 1 ? 1 : 64);
    auto q = RandomQ(s, n);
    ExpectClose(RunOne(s, pool.pool, pages.list(), 0, q), RunRef(s, pool.pool, pages.list(), 0, q),
                2e-5, "pages=" + std::to_string(n));
  }
}

TEST(PagedDecode, LargeLogitsStayFiniteAndAllEqualScoresAverageV) {
  AttentionShape s{1, 4, 2, 128, 32, ElemType::kF32, 0};
  Pool pool(s, 6, 3, 0, 4.0f);
  auto pages = Pages(6, 32, 32);
  auto big = RandomQ(s, 4, 300.0f);  // logits in the thousands
  auto r = RunOne(s, pool.pool, pages.list(), 0, big);
  for (float x : r.out) ASSERT_TRUE(std::isfinite(x));
  ExpectClose(r, RunRef(s, pool.pool, pages.list(), 0, big), 1e-3, "large logits");

  std::vector<float> zero(size_t{s.q_heads} * s.head_dim, 0.0f);  // every score equal
  auto z = RunOne(s, pool.pool, pages.list(), 0, zero);
  for (uint32_t h = 0; h < s.q_heads; ++h) {
    uint32_t kvh = h / 2;
    for (uint32_t j = 0; j < s.head_dim; ++j) {
      double mean = 0;
      for (uint32_t c = 0; c < 6; ++c)
        for (uint32_t t = 0; t < 32; ++t) {
          float v;
          std::memcpy(&v,
                      pool.bytes.data() + c * pool.pool.cell_stride +
                          (s.BlockElemOffset(0, 1, kvh) + t * s.head_dim + j) * 4,
                      4);
          mean += v;
        }
      ASSERT_NEAR(z.out[h * s.head_dim + j], mean / (6 * 32), 1e-5);
    }
    EXPECT_NEAR(z.lse[h], std::log(6.0f * 32), 1e-5);
  }
}

TEST(PagedDecode, SparseWithAllPagesEqualsDenseWhateverTheOrderOrSplit) {
  AttentionShape s{4, 32, 8, 128, 64, ElemType::kBf16, 0};
  Pool pool(s, 40, 11, 256);  // cells keep a 256-byte record header in front
  auto dense = Pages(40, 64, 13);
  auto q = RandomQ(s, 5);
  Result whole = RunOne(s, pool.pool, dense.list(), 3, q, /*threads=*/1, /*min_pages=*/1000);
  Result split = RunOne(s, pool.pool, dense.list(), 3, q, /*threads=*/8, /*min_pages=*/1);
  PageSet shuffled = dense;
  std::vector<size_t> order(40);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(9));
  for (size_t i = 0; i < 40; ++i) {
    shuffled.cells[i] = dense.cells[order[i]];
    shuffled.valid[i] = dense.valid[order[i]];
  }
  Result sparse = RunOne(s, pool.pool, shuffled.list(), 3, q);
  ExpectClose(split, whole, 1e-5, "split vs whole");
  ExpectClose(sparse, whole, 1e-5, "shuffled vs in order");
  ExpectClose(whole, RunRef(s, pool.pool, dense.list(), 3, q), 2e-5, "vs reference");
}

TEST(PagedDecode, MergeOfDisjointSubsetsEqualsTheUnion) {
  AttentionShape s{1, 8, 4, 64, 16, ElemType::kF32, 0};
  Pool pool(s, 10, 21);
  auto all = Pages(10, 16, 16);
  PageSet a, b;
  for (uint32_t i = 0; i < 10; ++i)
    (i % 3 ? a : b).cells.push_back(i), (i % 3 ? a : b).valid.push_back(16);
  auto q = RandomQ(s, 8);
  Result ra = RunRef(s, pool.pool, a.list(), 0, q), rb = RunRef(s, pool.pool, b.list(), 0, q);
  Result merged{std::vector<float>(q.size()), std::vector<float>(s.q_heads)};
  MergeAttentionStates(s.q_heads, s.head_dim, ra.out.data(), ra.lse.data(), rb.out.data(),
                       rb.lse.data(), merged.out.data(), merged.lse.data());
  ExpectClose(merged, RunRef(s, pool.pool, all.list(), 0, q), 1e-5, "merge");
  // An empty side (lse = -inf) leaves the other unchanged.
  std::vector<float> none_o(q.size(), 0.0f),
      none_l(s.q_heads, -std::numeric_limits<float>::infinity());
  MergeAttentionStates(s.q_heads, s.head_dim, ra.out.data(), ra.lse.data(), none_o.data(),
                       none_l.data(), merged.out.data(), merged.lse.data());
  ExpectClose(merged, ra, 0, "merge with empty");
}

TEST(PagedDecode, BatchOfSessionsAndLayersInOneCall) {
  AttentionShape s{3, 8, 2, 96, 32, ElemType::kBf16, 0};
  Pool pool(s, 30, 99);
  PageSet p0 = Pages(12, 32, 5), p1, p2 = Pages(1, 32, 1);
  for (uint32_t i = 29; i >= 12; i -= 3) p1.cells.push_back(i), p1.valid.push_back(32);
  DecodePlan plan;
  std::string why;
  ASSERT_EQ(BuildDecodePlan(s, {p0.list(), p1.list(), p2.list()}, pool.pool, 2, 1, &plan, &why),
            KernelStatus::kOk)
      << why;
  std::vector<std::vector<float>> qs, outs, lses;
  std::vector<DecodeItem> items;
  const PageSet* sets[] = {&p0, &p1, &p2};
  for (uint32_t seq = 0; seq < 3; ++seq)
    for (uint32_t layer = 0; layer < 3; ++layer) {
      qs.push_back(RandomQ(s, seq * 10 + layer));
      outs.emplace_back(qs.back().size());
      lses.emplace_back(s.q_heads);
    }
  for (uint32_t i = 0; i < 9; ++i)
    items.push_back({i / 3, i % 3, qs[i].data(), outs[i].data(), lses[i].data()});
  ASSERT_EQ(RunPagedDecode(plan, pool.pool, items.data(), items.size()), KernelStatus::kOk);
  for (uint32_t i = 0; i < 9; ++i)
    ExpectClose(Result{outs[i], lses[i]}, RunRef(s, pool.pool, sets[i / 3]->list(), i % 3, qs[i]),
                2e-5, "item " + std::to_string(i));
}

TEST(PagedDecode, BadInputIsAClearError) {
  AttentionShape s{1, 4, 2, 64, 16, ElemType::kF32, 0};
  Pool pool(s, 4, 1);
  DecodePlan plan;
  std::string why;
  PageList empty{nullptr, nullptr, 0};
  EXPECT_EQ(BuildDecodePlan(s, {empty}, pool.pool, 2, 1, &plan, &why),
            KernelStatus::kEmptyPageList);
  EXPECT_NE(why.find("no page"), std::string::npos);
  PageSet out_of_range = Pages(2, 16, 16, 3);  // cell 3 of 4 is fine, then 6 is not... use 5 pages
  out_of_range.cells.push_back(4);
  out_of_range.valid.push_back(16);
  EXPECT_EQ(BuildDecodePlan(s, {out_of_range.list()}, pool.pool, 2, 1, &plan, &why),
            KernelStatus::kBadPageIndex);
  PageSet zero_valid = Pages(1, 16, 0);
  EXPECT_EQ(BuildDecodePlan(s, {zero_valid.list()}, pool.pool, 2, 1, &plan, &why),
            KernelStatus::kBadPageIndex);
  AttentionShape bad = s;
  bad.head_dim = 72;
  EXPECT_EQ(BuildDecodePlan(bad, {Pages(1, 16, 1).list()}, pool.pool, 2, 1, &plan, &why),
            KernelStatus::kInvalidShape);
  EXPECT_NE(why.find("head_dim"), std::string::npos);
  bad = s;
  bad.q_heads = 5;
  EXPECT_EQ(bad.Validate(&why), KernelStatus::kInvalidShape);
  std::vector<float> q(256), o(256), l(4);
  EXPECT_EQ(reference::PagedDecode(s, pool.pool, empty, 0, q.data(), o.data(), l.data()),
            KernelStatus::kEmptyPageList);
}

}  // namespace
}  // namespace fm::kernels

#include <hwy/targets.h>

namespace fm::kernels {
namespace {

// Every SIMD target compiled into the binary that this CPU can run gives the reference's
// answer, not only the one dispatch picks.
TEST(PagedDecode, EveryCompiledCpuTargetMatchesTheReference) {
  AttentionShape s{2, 8, 2, 80, 32, ElemType::kBf16, 0};
  Pool pool(s, 9, 77);
  auto pages = Pages(9, 32, 17);
  auto q = RandomQ(s, 3);
  Result ref = RunRef(s, pool.pool, pages.list(), 1, q);
  int tried = 0;
  for (int64_t t : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(t);
    EXPECT_STREQ(CpuTargetName(), hwy::TargetName(t));
    std::printf("target %s\n", hwy::TargetName(t));
    ExpectClose(RunOne(s, pool.pool, pages.list(), 1, q), ref, 2e-5, hwy::TargetName(t));
    ++tried;
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tried, 2);
}

}  // namespace
}  // namespace fm::kernels

#include "flashmemory/kernels/level2.h"

namespace fm::kernels {
namespace {

TEST(Level2TopK, MatchesReferenceAndEqualsDenseWhenKCoversTheResidentSet) {
  for (ElemType dt : {ElemType::kF32, ElemType::kBf16}) {
    AttentionShape s{2, 8, 2, 64, 32, dt, 0};
    Pool pool(s, 12, 4);
    auto pages = Pages(12, 32, 20);  // 372 tokens
    auto q = RandomQ(s, 6, 2.0f);
    for (uint32_t k : {1u, 16u, 100u}) {
      Result got{std::vector<float>(q.size()), std::vector<float>(s.q_heads)};
      Result want = got;
      ASSERT_EQ(
          TopKDecode(s, pool.pool, pages.list(), 1, k, q.data(), got.out.data(), got.lse.data()),
          KernelStatus::kOk);
      ASSERT_EQ(reference::TopKDecode(s, pool.pool, pages.list(), 1, k, q.data(), want.out.data(),
                                      want.lse.data()),
                KernelStatus::kOk);
      ExpectClose(got, want, 2e-5, "topk=" + std::to_string(k));
    }
    Result all{std::vector<float>(q.size()), std::vector<float>(s.q_heads)};
    ASSERT_EQ(
        TopKDecode(s, pool.pool, pages.list(), 1, 2048, q.data(), all.out.data(), all.lse.data()),
        KernelStatus::kOk);
    ExpectClose(all, RunRef(s, pool.pool, pages.list(), 1, q), 2e-5, "topk covers the set");
  }
}

TEST(Level2TopK, KeepsTheStrongestTokenAndRejectsBadK) {
  AttentionShape s{1, 2, 1, 32, 8, ElemType::kF32, 0};
  Pool pool(s, 3, 2, 0, 0.01f);
  // Make token 5 of page 2 point along q: top-1 must attend to it alone.
  std::vector<float> q(2 * 32, 0.0f);
  q[0] = q[32] = 10.0f;
  float* k = reinterpret_cast<float*>(pool.bytes.data() + 2 * pool.pool.cell_stride) + 5 * 32;
  k[0] = 3.0f;
  float* v = reinterpret_cast<float*>(pool.bytes.data() + 2 * pool.pool.cell_stride) +
             s.BlockElemOffset(0, 1, 0) + 5 * 32;
  auto pages = Pages(3, 8, 8);
  std::vector<float> out(64), lse(2);
  ASSERT_EQ(TopKDecode(s, pool.pool, pages.list(), 0, 1, q.data(), out.data(), lse.data()),
            KernelStatus::kOk);
  for (int j = 0; j < 32; ++j) EXPECT_FLOAT_EQ(out[j], v[j]);
  EXPECT_EQ(TopKDecode(s, pool.pool, pages.list(), 0, 0, q.data(), out.data(), lse.data()),
            KernelStatus::kInvalidShape);
  EXPECT_EQ(TopKDecode(s, pool.pool, pages.list(), 0, 4096, q.data(), out.data(), lse.data()),
            KernelStatus::kInvalidShape);
  EXPECT_EQ(TopKDecode(s, pool.pool, PageList{}, 0, 4, q.data(), out.data(), lse.data()),
            KernelStatus::kEmptyPageList);
}

}  // namespace
}  // namespace fm::kernels

#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {
namespace {

TEST(PagePoolMemory, AlignedZeroedWritable) {
  const size_t bytes = (5u << 20) + 123;
  uint8_t* p = AllocatePagePoolMemory(bytes);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (2u << 20), 0u);
  EXPECT_EQ(p[0], 0);
  EXPECT_EQ(p[bytes - 1], 0);
  std::memset(p, 0xab, bytes);
  EXPECT_EQ(StreamReadSum(p, 64), 8 * 0xababababababababull);
  FreePagePoolMemory(p, bytes);
}

TEST(HugePageAllocator, LargeArraysAreHugePageAlignedAndGrowKeepingTheirBytes) {
  HugePageBytes small(1000, 7);
  EXPECT_EQ(small[999], 7);
  HugePageBytes b;
  // Grows through the 2 MiB threshold (operator new, then huge-page memory, then a larger
  // huge-page array), checking every byte written before each growth.
  for (size_t n : {size_t{4096}, size_t{3} << 20, size_t{9} << 20}) {
    const size_t old = b.size();
    b.resize(n);
    for (size_t i = 0; i < old; i += 4093) {
      ASSERT_EQ(b[i], static_cast<uint8_t>(i * 31 + 5)) << "byte " << i << " after growing to " << n;
    }
    for (size_t i = old; i < n; ++i) {
      ASSERT_EQ(b[i], 0) << "new byte " << i;
      b[i] = static_cast<uint8_t>(i * 31 + 5);
    }
    if (n >= HugePageAllocator<uint8_t>::kHugeBytes) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % HugePageAllocator<uint8_t>::kHugeBytes, 0u);
    }
  }
}

}  // namespace
}  // namespace fm::kernels
