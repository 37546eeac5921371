// The CUDA indexer chunk scoring and Quest kernels (device code), included by
// indexer_quest.cu and, behind kernels/testing/simt_emulator.h, by a CPU test.
//
// ScoreChunks: one thread per (layer, chunk). The layer's queries [Hi][di] and weights sit in
// shared memory and are read as broadcasts; each thread decodes its 132-byte key with the
// hardware fp8-e4m3 conversion and accumulates every head's dot product, so no cross-thread
// reduction is needed.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cuda/device_util.cuh"

namespace fm::kernels::cuda_indexer {

constexpr int kThreads = 256;        // ScoreChunks, QuestScores
constexpr int kBoundsThreads = 128;  // QuestBounds: a block per (layer, KV head)
constexpr uint32_t kMaxHeads = 64;

// kH > 0: the head count is a compile-time constant, so the accumulators live in registers;
// kH == 0: any head count up to kMaxHeads (accumulators may spill to local memory).
template <int kH>
FM_KERNEL void ScoreChunksKernel(uint32_t heads_rt, uint32_t dim, const float* __restrict__ q,
                                 const float* __restrict__ w,
                                 const uint8_t* const* __restrict__ keys, uint64_t chunks,
                                 float* __restrict__ logits) {
  FM_SHARED_FLOATS(smem);
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
  FM_UNROLL
  for (int h = 0; h < kAcc; ++h) acc[h] = 0.0f;
  for (uint32_t j = 0; j < dim; j += 4) {
    uint32_t word;
    memcpy(&word, key + j, 4);
    float k[4];
    FM_UNROLL
    for (int b = 0; b < 4; ++b) {
      __nv_fp8_e4m3 f8;
      f8.__x = static_cast<__nv_fp8_storage_t>((word >> (8 * b)) & 0xff);
      k[b] = static_cast<float>(f8);
    }
    FM_UNROLL
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

FM_KERNEL void QuestScoresKernel(uint32_t layers, uint32_t q_heads, uint32_t kv_heads, uint32_t d,
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
FM_KERNEL void QuestBoundsKernel(uint32_t kv_heads, uint32_t page_tokens, uint32_t d,
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

}  // namespace fm::kernels::cuda_indexer
