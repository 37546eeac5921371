// CUDA indexer scoring and Quest page scores vs the scalar references. Skips without a GPU.
#include "flashmemory/kernels/cuda_indexer.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "flashmemory/kernels/cuda_attention.h"
#include "kernels/testing/random_inputs.h"

namespace fm::kernels {
namespace {

template <typename T>
T* Upload(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, sizeof(T) * v.size());
  cudaMemcpy(d, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice);
  return d;
}

TEST(CudaIndexer, ScoreChunksMatchesReference) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  for (uint32_t heads : {16u, 5u}) {  // a compiled-in head count and the generic kernel
    IndexerShape s{3, heads, 128};
    const uint64_t chunks = 10007;
    testing::IndexInputs in = testing::RandomIndexInputs(s, chunks, 3);
    std::vector<const uint8_t*> dev_ptrs;
    for (auto& k : in.keys) dev_ptrs.push_back(Upload(k));
    const uint8_t** dkeys = Upload(dev_ptrs);
    float* dq = Upload(in.q);
    float* dw = Upload(in.w);
    float* dl = nullptr;
    cudaMalloc(&dl, sizeof(float) * s.layers * chunks);
    ASSERT_EQ(CudaScoreChunks(s, dq, dw, dkeys, chunks, dl, nullptr), KernelStatus::kOk);
    std::vector<float> got(s.layers * chunks), want(s.layers * chunks);
    cudaMemcpy(got.data(), dl, sizeof(float) * got.size(), cudaMemcpyDeviceToHost);
    ASSERT_EQ(reference::ScoreChunks(s, in.q.data(), in.w.data(), in.key_ptrs.data(), chunks,
                                     want.data()),
              KernelStatus::kOk);
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-3f * (1 + std::abs(want[i]))) << i;
    for (auto* p : dev_ptrs) cudaFree(const_cast<uint8_t*>(p));
    cudaFree(dkeys);
    cudaFree(dq);
    cudaFree(dw);
    cudaFree(dl);
  }
}

TEST(CudaQuest, PageScoresMatchReference) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  AttentionShape s{2, 8, 2, 128, 64, ElemType::kBf16, 0};
  const uint64_t pages = 3001;
  const std::vector<float> bounds = testing::RandomNormals(pages * QuestBoundsFloats(s), 4),
                           q = testing::RandomNormals(s.q_heads * s.head_dim, 5);
  float* db = Upload(bounds);
  float* dq = Upload(q);
  float* ds = nullptr;
  cudaMalloc(&ds, sizeof(float) * pages);
  ASSERT_EQ(CudaQuestPageScores(s, 1, dq, db, pages, ds, nullptr), KernelStatus::kOk);
  std::vector<float> got(pages), want(pages);
  cudaMemcpy(got.data(), ds, sizeof(float) * pages, cudaMemcpyDeviceToHost);
  ASSERT_EQ(reference::QuestPageScores(s, 1, q.data(), bounds.data(), pages, want.data()),
            KernelStatus::kOk);
  for (uint64_t p = 0; p < pages; ++p)
    ASSERT_NEAR(got[p], want[p], 1e-3f * (1 + std::abs(want[p]))) << p;
  cudaFree(db);
  cudaFree(dq);
  cudaFree(ds);
}

TEST(CudaQuest, BoundsMatchReference) {
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  AttentionShape s{3, 8, 4, 96, 32, ElemType::kBf16, 0};
  std::vector<uint8_t> page(s.PageBytes());
  std::mt19937 rng(9);
  for (auto& b : page) b = static_cast<uint8_t>(rng() & 0x3f);  // finite bf16 values
  uint8_t* dp = Upload(page);
  float* db = nullptr;
  cudaMalloc(&db, sizeof(float) * QuestBoundsFloats(s));
  ASSERT_EQ(CudaQuestBounds(s, dp, 21, db, nullptr), KernelStatus::kOk);
  std::vector<float> got(QuestBoundsFloats(s)), want(QuestBoundsFloats(s));
  cudaMemcpy(got.data(), db, sizeof(float) * got.size(), cudaMemcpyDeviceToHost);
  ASSERT_EQ(reference::QuestBounds(s, page.data(), 21, want.data()), KernelStatus::kOk);
  EXPECT_EQ(got, want);
  cudaFree(dp);
  cudaFree(db);
}

}  // namespace
}  // namespace fm::kernels
