// CUDA indexer chunk scoring and Quest page scores.
//
// ScoreChunks: one thread per (layer, chunk). The layer's queries [Hi][di] and weights sit in
// shared memory and are read as broadcasts; each thread decodes its 132-byte key with the
// hardware fp8-e4m3 conversion and accumulates every head's dot product, so no cross-thread
// reduction is needed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "flashmemory/kernels/cuda_indexer.h"
#include "kernels/cuda/device_util.cuh"

namespace fm::kernels {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kMaxHeads = 64;

// kH > 0: the head count is a compile-time constant, so the accumulators live in registers;
// kH == 0: any head count up to kMaxHeads (accumulators may spill to local memory).
template <int kH>
__global__ void ScoreChunksKernel(uint32_t heads_rt, uint32_t dim, const float* __restrict__ q,
                                  const float* __restrict__ w,
                                  const uint8_t* const* __restrict__ keys, uint64_t chunks,
                                  float* __restrict__ logits) {
  extern __shared__ float smem[];
  const uint32_t heads = kH > 0 ? kH : heads_rt;
  const uint32_t layer = blockIdx.y;
  float* qs = smem;
  float* ws = qs + heads * dim;
  for (uint32_t i = threadIdx.x; i < heads * dim; i += blockDim.x)
    qs[i] = q[size_t(layer) * heads * dim + i];
  for (uint32_t i = threadIdx.x; i < heads; i += blockDim.x) ws[i] = w[size_t(layer) * heads + i];
  __syncthreads();
  const uint64_t c = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  if (c >= chunks) return;
  const uint8_t* key = keys[layer] + c * (dim + 4);
  float scale;
  memcpy(&scale, key + dim, 4);
  constexpr int kAcc = kH > 0 ? kH : kMaxHeads;
  float acc[kAcc];
#pragma unroll
  for (int h = 0; h < kAcc; ++h) acc[h] = 0.0f;
  for (uint32_t j = 0; j < dim; j += 4) {
    uint32_t word;
    memcpy(&word, key + j, 4);
    float k[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      __nv_fp8_e4m3 f8;
      f8.__x = static_cast<__nv_fp8_storage_t>((word >> (8 * b)) & 0xff);
      k[b] = static_cast<float>(f8);
    }
#pragma unroll
    for (int h = 0; h < kAcc; ++h) {
      if (kH == 0 && h >= static_cast<int>(heads)) break;
      const float* qh = qs + h * dim + j;
      acc[h] += qh[0] * k[0] + qh[1] * k[1] + qh[2] * k[2] + qh[3] * k[3];
    }
  }
  float logit = 0.0f;
  for (uint32_t h = 0; h < heads; ++h) logit += ws[h] * fmaxf(acc[h] * scale, 0.0f);
  logits[size_t(layer) * chunks + c] = logit;
}

__global__ void QuestScoresKernel(uint32_t layers, uint32_t q_heads, uint32_t kv_heads, uint32_t d,
                                  uint32_t layer, float scale, const float* __restrict__ q,
                                  const float* __restrict__ bounds, uint64_t pages,
                                  float* __restrict__ score) {
  const uint64_t p = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  if (p >= pages) return;
  const uint32_t g = q_heads / kv_heads;
  const size_t stride = size_t(layers) * kv_heads * 2 * d;
  float best = -INFINITY;
  for (uint32_t h = 0; h < q_heads; ++h) {
    const float* mn = bounds + p * stride + (size_t(layer) * kv_heads + h / g) * 2 * d;
    const float* mx = mn + d;
    float ub = 0.0f;
    for (uint32_t j = 0; j < d; ++j) {
      const float qj = q[size_t(h) * d + j];
      ub += fmaxf(qj * mn[j], qj * mx[j]);
    }
    best = fmaxf(best, ub * scale);
  }
  score[p] = best;
}

// One block per (layer, KV head) of one page; threads own head_dim elements.
template <typename T>
__global__ void QuestBoundsKernel(uint32_t kv_heads, uint32_t page_tokens, uint32_t d,
                                  const uint8_t* __restrict__ page, uint32_t valid,
                                  float* __restrict__ out) {
  const uint32_t layer = blockIdx.x / kv_heads, h = blockIdx.x % kv_heads;
  const T* K =
      reinterpret_cast<const T*>(page) + ((size_t(layer) * 2) * kv_heads + h) * page_tokens * d;
  float* mn = out + (size_t(layer) * kv_heads + h) * 2 * d;
  for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
    float lo = INFINITY, hi = -INFINITY;
    for (uint32_t t = 0; t < valid; ++t) {
      const float v = ToF(K[size_t(t) * d + j]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    mn[j] = lo;
    mn[d + j] = hi;
  }
}

}  // namespace

KernelStatus CudaQuestBounds(const AttentionShape& s, const uint8_t* page, uint32_t valid,
                             float* out, void* stream) {
  if (s.Validate(nullptr) != KernelStatus::kOk) return KernelStatus::kInvalidShape;
  if (valid == 0 || valid > s.page_tokens) return KernelStatus::kBadPageIndex;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const unsigned blocks = s.layers * s.kv_heads;
  switch (s.dtype) {
    case ElemType::kF32:
      QuestBoundsKernel<float>
          <<<blocks, 128, 0, st>>>(s.kv_heads, s.page_tokens, s.head_dim, page, valid, out);
      break;
    case ElemType::kF16:
      QuestBoundsKernel<__half>
          <<<blocks, 128, 0, st>>>(s.kv_heads, s.page_tokens, s.head_dim, page, valid, out);
      break;
    case ElemType::kBf16:
      QuestBoundsKernel<__nv_bfloat16>
          <<<blocks, 128, 0, st>>>(s.kv_heads, s.page_tokens, s.head_dim, page, valid, out);
      break;
  }
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
