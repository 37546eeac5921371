// CUDA indexer chunk scoring and Quest page scores: the host side of the kernels in
// indexer_quest_kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "flashmemory/kernels/cuda_indexer.h"
#include "kernels/cuda/indexer_quest_kernel.cuh"

namespace fm::kernels {
using namespace cuda_indexer;

KernelStatus CudaQuestBounds(const AttentionShape& s, const uint8_t* page, uint32_t valid,
                             float* out, void* stream) {
  if (s.Validate(nullptr) != KernelStatus::kOk) return KernelStatus::kInvalidShape;
  if (valid == 0 || valid > s.page_tokens) return KernelStatus::kBadPageIndex;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const unsigned blocks = s.layers * s.kv_heads;
  DispatchElemType(s.dtype, [&](auto elem) {
    QuestBoundsKernel<decltype(elem)><<<blocks, kBoundsThreads, 0, st>>>(
        s.kv_heads, s.page_tokens, s.head_dim, page, valid, out);
  });
  return cudaGetLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

KernelStatus CudaScoreChunks(const IndexerShape& s, const float* q, const float* w,
                             const uint8_t* const* keys, uint64_t chunks, float* logits,
                             void* stream) {
  std::string why;
  if (s.Validate(&why) != KernelStatus::kOk || s.heads > kMaxHeads)
    return KernelStatus::kInvalidShape;
  const size_t shmem = (size_t(s.heads) * s.dim + s.heads) * sizeof(float);
  if (shmem > 48 * 1024) return KernelStatus::kInvalidShape;
  if (chunks == 0) return KernelStatus::kOk;
  dim3 grid(static_cast<unsigned>((chunks + kThreads - 1) / kThreads), s.layers);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (s.heads) {
    case 8:
      ScoreChunksKernel<8>
          <<<grid, kThreads, shmem, st>>>(s.heads, s.dim, q, w, keys, chunks, logits);
      break;
    case 16:
      ScoreChunksKernel<16>
          <<<grid, kThreads, shmem, st>>>(s.heads, s.dim, q, w, keys, chunks, logits);
      break;
    case 32:
      ScoreChunksKernel<32>
          <<<grid, kThreads, shmem, st>>>(s.heads, s.dim, q, w, keys, chunks, logits);
      break;
    default:
      ScoreChunksKernel<0>
          <<<grid, kThreads, shmem, st>>>(s.heads, s.dim, q, w, keys, chunks, logits);
  }
  return cudaGetLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

KernelStatus CudaQuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                                 const float* bounds, uint64_t pages, float* score, void* stream) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  if (pages == 0) return KernelStatus::kOk;
  QuestScoresKernel<<<static_cast<unsigned>((pages + kThreads - 1) / kThreads), kThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(
      s.layers, s.q_heads, s.kv_heads, s.head_dim, layer, s.Scale(), q, bounds, pages, score);
  return cudaGetLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

}  // namespace fm::kernels
