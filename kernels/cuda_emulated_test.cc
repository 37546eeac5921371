// The CUDA kernels run on the CPU by the SIMT emulator, against the scalar references:
// their indexing, lane mapping, shuffles, block scans and merges are checked on every
// build, GPU or not (a GPU runs them through the CUDA API in kernels_cuda_test).
#include <gtest/gtest.h>

#include <random>

#include "flashmemory/kernels/indexer.h"
#include "flashmemory/kernels/level2.h"
#include "flashmemory/kernels/quest.h"
#include "kernels/testing/random_inputs.h"
#include "kernels/testing/random_pages.h"
// The kernel source needs the emulator's CUDA names first.
// clang-format off
#include "kernels/testing/simt_emulator.h"
#include "kernels/cuda/indexer_quest_kernel.cuh"
#include "kernels/cuda/level2_kernel.cuh"
#include "kernels/cuda/paged_decode_kernel.cuh"
// clang-format on

namespace fm::kernels {
namespace {

using namespace cuda_decode;

// What CudaRunPagedDecode launches, run on the emulator with host memory as device memory.
KernelStatus EmulatedDecode(const DecodePlan& plan, const PagePool& pool, const DecodeItem* items,
                            size_t n_items) {
  const AttentionShape& s = plan.shape;
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim;
  LaunchLists lists;
  if (KernelStatus st = BuildLaunchLists(plan, items, n_items, &lists); st != KernelStatus::kOk)
    return st;
  std::vector<uint32_t> cells, first;
  std::vector<uint16_t> valid;
  ConcatPageLists(plan, &cells, &valid, &first);
  std::vector<float> p_out(n_items * plan.num_partials * G * d, NAN),
      p_lse(n_items * plan.num_partials * G, NAN);
  const KShape ks{s.layers, s.q_heads, s.kv_heads, s.head_dim, s.page_tokens, s.Scale()};
  const RowGeometry g = Geometry(s);
  const simt::Dim3 grid{static_cast<unsigned>(lists.tasks.size()), HeadBlocks(s), 1};
  DispatchDecode(s, [&](auto elem, auto nv) {
    simt::Launch(grid, {kThreads, 1, 1}, SharedFloats(d, s.page_tokens) * sizeof(float), [&] {
      PagedDecodeKernel<decltype(elem), decltype(nv)::value>(
          ks, g, pool.base, pool.cell_stride, pool.cell_offset, cells.data(), valid.data(),
          first.data(), plan.units.data(), lists.items.data(), lists.tasks.data(), p_out.data(),
          p_lse.data(), plan.num_partials);
    });
  });
  if (!lists.merges.empty())
    simt::Launch({static_cast<unsigned>(lists.merges.size()), 1, 1}, {kThreads, 1, 1}, 0, [&] {
      MergeKernel(G, d, lists.items.data(), lists.merges.data(), p_out.data(), p_lse.data(),
                  plan.num_partials);
    });
  return KernelStatus::kOk;
}

// Runs `plan` for one item (seq, layer) and compares output and LSE with the reference.
void ExpectMatchesReference(const DecodePlan& plan, const PagePool& pool, uint32_t seq,
                            uint32_t layer, uint64_t seed, const std::string& what) {
  const AttentionShape& s = plan.shape;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t{s.q_heads} * s.head_dim), out(q.size(), NAN), lse(s.q_heads, NAN);
  for (float& x : q) x = nd(rng);
  DecodeItem item{seq, layer, q.data(), out.data(), lse.data()};
  ASSERT_EQ(EmulatedDecode(plan, pool, &item, 1), KernelStatus::kOk) << what;
  std::vector<float> want(q.size()), want_lse(s.q_heads);
  ASSERT_EQ(reference::PagedDecode(s, pool, plan.seqs[seq], layer, q.data(), want.data(),
                                   want_lse.data()),
            KernelStatus::kOk);
  for (size_t i = 0; i < out.size(); ++i)
    ASSERT_NEAR(out[i], want[i], 1e-4) << what << " output " << i;
  for (uint32_t h = 0; h < s.q_heads; ++h) ASSERT_NEAR(lse[h], want_lse[h], 1e-4) << what;
}

// Nine pages over `num_cells` cells in a scattered order, the last one partial.
struct ScatteredPages {
  std::vector<uint32_t> cells;
  std::vector<uint16_t> valid;
  ScatteredPages(uint32_t num_cells, uint16_t page_tokens, uint16_t last_valid) {
    for (uint32_t i = 0; i < 9; ++i) cells.push_back((i * 5) % num_cells);
    valid.assign(9, page_tokens);
    valid.back() = last_valid;
  }
  PageList list() const { return {cells.data(), valid.data(), 9}; }
};

TEST(CudaPagedDecodeEmulated, MatchesReferenceForEveryTypeAndHeadDim) {
  for (ElemType dt : {ElemType::kF32, ElemType::kF16, ElemType::kBf16}) {
    for (uint32_t d : {32u, 80u, 128u, 256u}) {
      const AttentionShape s{2, 8, 2, d, 64, dt, 0};
      const uint32_t num_cells = 12;
      std::vector<uint8_t> host = testing::RandomPages(s, num_cells, d + 3);
      const PagePool pool{host.data(), s.PageBytes(), 0, num_cells};
      const ScatteredPages pages(num_cells, 64, 9);
      const PageList list = pages.list();
      for (uint32_t min_pages : {1000u, 2u}) {  // whole units, then split units merged by LSE
        DecodePlan plan;
        std::string why;
        ASSERT_EQ(BuildDecodePlan(s, {list}, pool, 8, min_pages, &plan, &why), KernelStatus::kOk)
            << why;
        ASSERT_EQ(plan.num_partials > 0, min_pages == 2u);
        ExpectMatchesReference(plan, pool, 0, 1, d,
                               "dtype " + std::to_string(static_cast<int>(dt)) + " d=" +
                                   std::to_string(d) + " min_pages=" + std::to_string(min_pages));
      }
    }
  }
}

// A group of six query heads (two head blocks, the second one partly padded), 32-token
// pages, and a batch of two sequences whose items write (or skip) their LSE.
TEST(CudaPagedDecodeEmulated, WideGroupsAndBatches) {
  const AttentionShape s{3, 12, 2, 64, 32, ElemType::kBf16, 0};
  const uint32_t num_cells = 10;
  std::vector<uint8_t> host = testing::RandomPages(s, num_cells, 21);
  const PagePool pool{host.data(), s.PageBytes(), 0, num_cells};
  std::vector<uint32_t> c0 = {9, 2, 4, 6, 8}, c1 = {1};
  std::vector<uint16_t> v0 = {32, 32, 32, 32, 5}, v1 = {3};
  const std::vector<PageList> lists = {{c0.data(), v0.data(), 5}, {c1.data(), v1.data(), 1}};
  DecodePlan plan;
  std::string why;
  ASSERT_EQ(BuildDecodePlan(s, lists, pool, 4, 1, &plan, &why), KernelStatus::kOk) << why;
  ExpectMatchesReference(plan, pool, 0, 2, 1, "seq 0");
  ExpectMatchesReference(plan, pool, 1, 0, 2, "seq 1");
  // Both sequences in one launch; the second item has no LSE output.
  const size_t per = size_t{s.q_heads} * s.head_dim;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> q(2 * per), out(2 * per, NAN), lse(s.q_heads, NAN);
  for (float& x : q) x = nd(rng);
  const DecodeItem items[2] = {{1, 1, q.data(), out.data(), lse.data()},
                               {0, 0, q.data() + per, out.data() + per, nullptr}};
  ASSERT_EQ(EmulatedDecode(plan, pool, items, 2), KernelStatus::kOk);
  for (int i = 0; i < 2; ++i) {
    std::vector<float> want(per), want_lse(s.q_heads);
    ASSERT_EQ(reference::PagedDecode(s, pool, lists[items[i].seq], items[i].layer,
                                     q.data() + i * per, want.data(), want_lse.data()),
              KernelStatus::kOk);
    for (size_t j = 0; j < per; ++j) ASSERT_NEAR(out[i * per + j], want[j], 1e-4) << "item " << i;
    if (i == 0) {
      for (uint32_t h = 0; h < s.q_heads; ++h) ASSERT_NEAR(lse[h], want_lse[h], 1e-4);
    }
  }
  // An item of a sequence the plan does not have is refused before any launch.
  const DecodeItem bad{2, 0, q.data(), out.data(), nullptr};
  EXPECT_EQ(EmulatedDecode(plan, pool, &bad, 1), KernelStatus::kInvalidShape);
}

// ScoreChunks as CudaScoreChunks launches it: a thread per (layer, chunk), the compiled-in
// head counts and the generic kernel.
TEST(CudaIndexerEmulated, ScoreChunksMatchesReference) {
  using namespace cuda_indexer;
  for (uint32_t heads : {16u, 5u}) {
    const IndexerShape s{2, heads, 128};
    const uint64_t chunks = 300;  // a partial last block
    testing::IndexInputs in = testing::RandomIndexInputs(s, chunks, 3);
    std::vector<float> got(s.layers * chunks, NAN), want(s.layers * chunks);
    const simt::Dim3 grid{
        static_cast<unsigned>((chunks + cuda_indexer::kThreads - 1) / cuda_indexer::kThreads),
        s.layers, 1};
    const size_t shmem = (size_t{s.heads} * s.dim + s.heads) * sizeof(float);
    simt::Launch(grid, {cuda_indexer::kThreads, 1, 1}, shmem, [&] {
      if (heads == 16)
        ScoreChunksKernel<16>(s.heads, s.dim, in.q.data(), in.w.data(), in.key_ptrs.data(), chunks,
                              got.data());
      else
        ScoreChunksKernel<0>(s.heads, s.dim, in.q.data(), in.w.data(), in.key_ptrs.data(), chunks,
                             got.data());
    });
    ASSERT_EQ(reference::ScoreChunks(s, in.q.data(), in.w.data(), in.key_ptrs.data(), chunks,
                                     want.data()),
              KernelStatus::kOk);
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-3f * (1 + std::abs(want[i])))
          << "heads " << heads << " " << i;
  }
}

TEST(CudaQuestEmulated, BoundsAndPageScoresMatchReference) {
  using namespace cuda_indexer;
  const AttentionShape s{3, 8, 4, 96, 32, ElemType::kBf16, 0};
  std::vector<uint8_t> page = testing::RandomPages(s, 1, 9);
  std::vector<float> got(QuestBoundsFloats(s), NAN), want(QuestBoundsFloats(s));
  simt::Launch({s.layers * s.kv_heads, 1, 1}, {kBoundsThreads, 1, 1}, 0, [&] {
    QuestBoundsKernel<__nv_bfloat16>(s.kv_heads, s.page_tokens, s.head_dim, page.data(), 21,
                                     got.data());
  });
  ASSERT_EQ(reference::QuestBounds(s, page.data(), 21, want.data()), KernelStatus::kOk);
  EXPECT_EQ(got, want);
  // Page scores over bounds of 301 pages, for layer 1.
  const uint64_t pages = 301;
  const std::vector<float> bounds = testing::RandomNormals(pages * QuestBoundsFloats(s), 4),
                           q = testing::RandomNormals(s.q_heads * s.head_dim, 5);
  std::vector<float> score(pages, NAN), want_score(pages);
  simt::Launch(
      {static_cast<unsigned>((pages + cuda_indexer::kThreads - 1) / cuda_indexer::kThreads), 1, 1},
      {cuda_indexer::kThreads, 1, 1}, 0, [&] {
        QuestScoresKernel(s.layers, s.q_heads, s.kv_heads, s.head_dim, 1, s.Scale(), q.data(),
                          bounds.data(), pages, score.data());
      });
  ASSERT_EQ(reference::QuestPageScores(s, 1, q.data(), bounds.data(), pages, want_score.data()),
            KernelStatus::kOk);
  for (uint64_t p = 0; p < pages; ++p)
    ASSERT_NEAR(score[p], want_score[p], 1e-3f * (1 + std::abs(want_score[p]))) << p;
}

// The level-2 kernels as CudaTopKDecode launches them: scores (a warp per token), the radix
// select and in-order compaction (a block per KV head, block scans), then softmax and V.
TEST(CudaLevel2Emulated, TopKMatchesReference) {
  using namespace cuda_level2;
  for (ElemType dt : {ElemType::kF32, ElemType::kBf16}) {
    const AttentionShape s{2, 8, 2, 128, 64, dt, 0};
    const uint32_t num_cells = 12;
    std::vector<uint8_t> host = testing::RandomPages(s, num_cells, 7);
    const PagePool pool{host.data(), s.PageBytes(), 0, num_cells};
    const ScatteredPages pages(num_cells, 64, 11);
    const PageList list = pages.list();
    std::mt19937 rng(8);
    std::normal_distribution<float> nd;
    std::vector<float> q(s.q_heads * s.head_dim);
    for (float& x : q) x = nd(rng) * 2;
    std::vector<uint32_t> tok_cell;
    std::vector<uint16_t> tok_t;
    ASSERT_EQ(ListTokens(s, pool, list, &tok_cell, &tok_t), KernelStatus::kOk);
    const uint32_t n = static_cast<uint32_t>(tok_cell.size()), G = s.q_heads / s.kv_heads;
    const L2Shape ls{s.q_heads, s.kv_heads, s.head_dim, s.page_tokens, s.Scale()};
    const size_t kofs = s.BlockElemOffset(1, 0, 0), vofs = s.BlockElemOffset(1, 1, 0);
    for (uint32_t topk : {1u, 16u, 100u, 2048u}) {
      const uint32_t k = std::min(topk, n);
      std::vector<float> sc(size_t{n} * s.q_heads), best(size_t{n} * s.kv_heads);
      std::vector<uint32_t> sel(size_t{k} * s.kv_heads);
      std::vector<float> out(q.size(), NAN), lse(s.q_heads, NAN);
      DispatchElemType(dt, [&](auto elem) {
        using T = decltype(elem);
        simt::Launch(
            {(n + kScoreWarps - 1) / kScoreWarps, s.kv_heads, 1}, {kScoreWarps * 32, 1, 1}, 0, [&] {
              L2Scores<T>(ls, pool.base, pool.cell_stride, pool.cell_offset, tok_cell.data(),
                          tok_t.data(), n, kofs, q.data(), sc.data(), best.data());
            });
        simt::Launch({s.kv_heads, 1, 1}, {kSelectThreads, 1, 1}, 0,
                     [&] { L2Select(best.data(), n, k, sel.data()); });
        simt::Launch({s.kv_heads, 1, 1}, {kAttendThreads, 1, 1}, sizeof(float) * 2 * G, [&] {
          L2Attend<T>(ls, pool.base, pool.cell_stride, pool.cell_offset, tok_cell.data(),
                      tok_t.data(), n, k, vofs, sc.data(), sel.data(), out.data(), lse.data());
        });
      });
      std::vector<float> want(q.size()), wlse(s.q_heads);
      ASSERT_EQ(reference::TopKDecode(s, pool, list, 1, topk, q.data(), want.data(), wlse.data()),
                KernelStatus::kOk);
      for (size_t i = 0; i < out.size(); ++i)
        ASSERT_NEAR(out[i], want[i], 1e-3) << "k=" << topk << " i=" << i;
      for (uint32_t h = 0; h < s.q_heads; ++h) ASSERT_NEAR(lse[h], wlse[h], 1e-3) << "k=" << topk;
    }
  }
}

TEST(CudaMergeEmulated, MatchesCpuMerge) {
  using namespace cuda_level2;
  const uint32_t heads = 8, d = 96;
  const testing::MergeInputs in = testing::RandomMergeInputs(heads, d, 5);
  std::vector<float> got(heads * d, NAN), gl(heads, NAN);
  // Fewer threads than elements: the grid-stride loop covers the rest.
  simt::Launch({2, 1, 1}, {64, 1, 1}, 0, [&] {
    MergeStates(heads, d, in.oa.data(), in.la.data(), in.ob.data(), in.lb.data(), got.data(),
                gl.data());
  });
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], in.want[i], 1e-5) << i;
  for (uint32_t h = 0; h < heads; ++h) ASSERT_NEAR(gl[h], in.want_lse[h], 1e-5) << h;
}

}  // namespace
}  // namespace fm::kernels
