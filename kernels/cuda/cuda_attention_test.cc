// CUDA paged decode vs the scalar reference. Skips cleanly without a GPU (label "gpu").
#include "flashmemory/kernels/cuda_attention.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "kernels/testing/random_pages.h"

namespace fm::kernels {
namespace {

TEST(CudaPagedDecode, MatchesReference) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  for (ElemType dt : {ElemType::kF32, ElemType::kF16, ElemType::kBf16}) {
    for (uint32_t d : {32u, 64u, 80u, 128u, 256u}) {
      AttentionShape s{2, 8, 2, d, 64, dt, 0};
      const uint32_t cells = 40;
      std::vector<uint8_t> host = testing::RandomPages(s, cells, d);
      std::mt19937 rng(d + 1);
      std::normal_distribution<float> nd;
      std::vector<uint32_t> pcells;
      std::vector<uint16_t> valid;
      for (uint32_t i = 0; i < 33; ++i)
        pcells.push_back((i * 7) % cells), valid.push_back(i == 32 ? 9 : 64);
      PageList list{pcells.data(), valid.data(), 33};
      PagePool hpool{host.data(), s.PageBytes(), 0, cells};
      uint8_t* dpool = nullptr;
      ASSERT_EQ(cudaMalloc(&dpool, host.size()), cudaSuccess);
      cudaMemcpy(dpool, host.data(), host.size(), cudaMemcpyHostToDevice);
      PagePool gpool{dpool, s.PageBytes(), 0, cells};
      for (uint32_t min_pages : {1000u, 4u}) {  // whole units, then split units merged by LSE
        DecodePlan plan;
        ASSERT_EQ(BuildDecodePlan(s, {list}, gpool, 8, min_pages, &plan, &why), KernelStatus::kOk)
            << why;
        std::unique_ptr<CudaDecodePlan> gplan;
        ASSERT_EQ(CudaDecodePlan::Upload(plan, &gplan, &why), KernelStatus::kOk) << why;
        std::vector<float> q(8 * d);
        for (float& x : q) x = nd(rng);
        float *dq, *dout, *dlse;
        cudaMalloc(&dq, q.size() * 4);
        cudaMalloc(&dout, q.size() * 4);
        cudaMalloc(&dlse, 8 * 4);
        cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice);
        DecodeItem item{0, 1, dq, dout, dlse};
        ASSERT_EQ(CudaRunPagedDecode(*gplan, gpool, &item, 1, nullptr), KernelStatus::kOk);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<float> out(q.size()), lse(8), rout(q.size()), rlse(8);
        cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(lse.data(), dlse, 8 * 4, cudaMemcpyDeviceToHost);
        ASSERT_EQ(reference::PagedDecode(s, hpool, list, 1, q.data(), rout.data(), rlse.data()),
                  KernelStatus::kOk);
        for (size_t i = 0; i < out.size(); ++i)
          ASSERT_NEAR(out[i], rout[i], 1e-4) << "d=" << d << " i=" << i;
        for (int h = 0; h < 8; ++h) ASSERT_NEAR(lse[h], rlse[h], 1e-3);
        cudaFree(dq);
        cudaFree(dout);
        cudaFree(dlse);
      }
      cudaFree(dpool);
    }
  }
}

}  // namespace
}  // namespace fm::kernels

namespace fm::kernels {
namespace {

// Several sessions and layers in one call, one item without an lse output.
TEST(CudaPagedDecode, BatchOfSessionsAndLayers) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  AttentionShape s{3, 8, 2, 128, 32, ElemType::kBf16, 0};
  const uint32_t cells = 30;
  std::vector<uint8_t> host = testing::RandomPages(s, cells, 11);
  std::mt19937 rng(12);
  std::normal_distribution<float> nd;
  uint8_t* dpool = nullptr;
  ASSERT_EQ(cudaMalloc(&dpool, host.size()), cudaSuccess);
  cudaMemcpy(dpool, host.data(), host.size(), cudaMemcpyHostToDevice);
  PagePool hpool{host.data(), s.PageBytes(), 0, cells}, gpool{dpool, s.PageBytes(), 0, cells};
  std::vector<uint32_t> c0 = {0, 3, 5, 7, 9, 11}, c1 = {29};
  std::vector<uint16_t> v0 = {32, 32, 32, 32, 32, 17}, v1 = {3};
  std::vector<PageList> lists = {{c0.data(), v0.data(), 6}, {c1.data(), v1.data(), 1}};
  DecodePlan plan;
  ASSERT_EQ(BuildDecodePlan(s, lists, gpool, 16, 1, &plan, &why), KernelStatus::kOk) << why;
  std::unique_ptr<CudaDecodePlan> gplan;
  ASSERT_EQ(CudaDecodePlan::Upload(plan, &gplan, &why), KernelStatus::kOk) << why;
  const size_t per = size_t{s.q_heads} * s.head_dim;
  std::vector<float> q(4 * per);
  for (float& x : q) x = nd(rng);
  float *dq, *dout, *dlse;
  cudaMalloc(&dq, q.size() * 4);
  cudaMalloc(&dout, q.size() * 4);
  cudaMalloc(&dlse, 4 * s.q_heads * 4);
  cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice);
  const uint32_t seqs[4] = {0, 0, 1, 1}, layers[4] = {0, 2, 1, 2};
  std::vector<DecodeItem> items;
  for (int i = 0; i < 4; ++i)
    items.push_back({seqs[i], layers[i], dq + i * per, dout + i * per,
                     i == 3 ? nullptr : dlse + i * s.q_heads});
  ASSERT_EQ(CudaRunPagedDecode(*gplan, gpool, items.data(), items.size(), nullptr),
            KernelStatus::kOk);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> out(q.size());
  cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
  for (int i = 0; i < 4; ++i) {
    std::vector<float> want(per), lse(s.q_heads);
    ASSERT_EQ(reference::PagedDecode(s, hpool, lists[seqs[i]], layers[i], q.data() + i * per,
                                     want.data(), lse.data()),
              KernelStatus::kOk);
    for (size_t j = 0; j < per; ++j) ASSERT_NEAR(out[i * per + j], want[j], 1e-4) << "item " << i;
  }
  // A pool whose cells are not 16-byte aligned is refused before any launch.
  PagePool skewed = gpool;
  skewed.cell_offset = 8;
  EXPECT_EQ(CudaRunPagedDecode(*gplan, skewed, items.data(), items.size(), nullptr),
            KernelStatus::kInvalidShape);
  cudaFree(dq);
  cudaFree(dout);
  cudaFree(dlse);
  cudaFree(dpool);
}

}  // namespace
}  // namespace fm::kernels
