// CUDA level-2 top-k decode and state merge vs the scalar references. Skips without a GPU.
#include "flashmemory/kernels/cuda_level2.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "flashmemory/kernels/cuda_attention.h"
#include "kernels/testing/random_inputs.h"
#include "kernels/testing/random_pages.h"

namespace fm::kernels {
namespace {

TEST(CudaLevel2, TopKMatchesReference) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  for (ElemType dt : {ElemType::kF32, ElemType::kBf16}) {
    AttentionShape s{2, 8, 2, 128, 64, dt, 0};
    const uint32_t cells = 50;
    std::vector<uint8_t> host = testing::RandomPages(s, cells, 7);
    std::mt19937 rng(8);
    std::normal_distribution<float> nd;
    uint8_t* dpool = nullptr;
    ASSERT_EQ(cudaMalloc(&dpool, host.size()), cudaSuccess);
    cudaMemcpy(dpool, host.data(), host.size(), cudaMemcpyHostToDevice);
    PagePool hpool{host.data(), s.PageBytes(), 0, cells}, gpool{dpool, s.PageBytes(), 0, cells};
    std::vector<uint32_t> pc;
    std::vector<uint16_t> pv;
    for (uint32_t i = 0; i < 40; ++i) pc.push_back(i), pv.push_back(i == 39 ? 11 : 64);
    PageList list{pc.data(), pv.data(), 40};
    std::vector<float> q(s.q_heads * s.head_dim);
    for (float& x : q) x = nd(rng) * 2;
    float *dq, *dout, *dlse;
    cudaMalloc(&dq, q.size() * 4);
    cudaMalloc(&dout, q.size() * 4);
    cudaMalloc(&dlse, s.q_heads * 4);
    cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice);
    for (uint32_t k : {1u, 16u, 100u, 2048u}) {
      ASSERT_EQ(CudaTopKDecode(s, gpool, list, 1, k, dq, dout, dlse, nullptr), KernelStatus::kOk);
      std::vector<float> got(q.size()), glse(s.q_heads), want(q.size()), wlse(s.q_heads);
      cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(glse.data(), dlse, glse.size() * 4, cudaMemcpyDeviceToHost);
      ASSERT_EQ(reference::TopKDecode(s, hpool, list, 1, k, q.data(), want.data(), wlse.data()),
                KernelStatus::kOk);
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], want[i], 1e-3) << "k=" << k << " i=" << i;
      for (uint32_t h = 0; h < s.q_heads; ++h) ASSERT_NEAR(glse[h], wlse[h], 1e-3) << "k=" << k;
    }
    EXPECT_EQ(CudaTopKDecode(s, gpool, list, 1, 0, dq, dout, dlse, nullptr),
              KernelStatus::kInvalidShape);
    cudaFree(dq);
    cudaFree(dout);
    cudaFree(dlse);
    cudaFree(dpool);
  }
}

TEST(CudaMerge, MatchesCpuMerge) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  const uint32_t heads = 8, d = 96;
  const testing::MergeInputs in = testing::RandomMergeInputs(heads, d, 5);
  float* dev = nullptr;
  cudaMalloc(&dev, sizeof(float) * (3 * heads * d + 3 * heads));
  float *doa = dev, *dob = doa + heads * d, *dout = dob + heads * d, *dla = dout + heads * d,
        *dlb = dla + heads, *dl = dlb + heads;
  cudaMemcpy(doa, in.oa.data(), in.oa.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dob, in.ob.data(), in.ob.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dla, in.la.data(), in.la.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dlb, in.lb.data(), in.lb.size() * 4, cudaMemcpyHostToDevice);
  ASSERT_EQ(CudaMergeAttentionStates(heads, d, doa, dla, dob, dlb, dout, dl, nullptr),
            KernelStatus::kOk);
  std::vector<float> got(heads * d), gl(heads);
  cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(gl.data(), dl, gl.size() * 4, cudaMemcpyDeviceToHost);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], in.want[i], 1e-5);
  for (uint32_t h = 0; h < heads; ++h) ASSERT_NEAR(gl[h], in.want_lse[h], 1e-5);
  cudaFree(dev);
}

}  // namespace
}  // namespace fm::kernels
