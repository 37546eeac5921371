// The CUDA level-2 top-k decode and state merge kernels (device code), included by
// level2_merge.cu and, behind kernels/testing/simt_emulator.h, by a CPU test.
//
// TopKDecode, per KV head: (1) a warp per resident token scores it for every query head of
// the group (best = max over heads); (2) one block finds the k-th largest best score with a
// 4-pass radix select on order-preserving keys and compacts the kept tokens in index order
// (ties: lower index first, as the reference); (3) one block runs softmax and the V sum over
// the kept tokens.
#pragma once

#include <cstdint>
#include <vector>

#include "flashmemory/kernels/attention.h"
#include "kernels/cuda/device_util.cuh"

namespace fm::kernels::cuda_level2 {

// Larger float -> larger unsigned key.
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr uint32_t kScoreWarps = 8;       // L2Scores: a warp per token, 8 per block
constexpr uint32_t kAttendThreads = 256;  // L2Attend: a block per KV head

// The tokens of a page list as (cell, token in the page) pairs, in list order.
inline KernelStatus ListTokens(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                               std::vector<uint32_t>* tok_cell, std::vector<uint16_t>* tok_t) {
  for (uint32_t i = 0; i < pages.count; ++i) {
    if (pages.cells[i] >= pool.num_cells || pages.valid[i] == 0 || pages.valid[i] > s.page_tokens)
      return KernelStatus::kBadPageIndex;
    for (uint32_t t = 0; t < pages.valid[i]; ++t)
      tok_cell->push_back(pages.cells[i]), tok_t->push_back(static_cast<uint16_t>(t));
  }
  return KernelStatus::kOk;
}

struct L2Shape {
  uint32_t q_heads, kv_heads, head_dim, page_tokens;
  float scale;
};

template <typename T>
FM_KERNEL void L2Scores(L2Shape s, const uint8_t* __restrict__ base, size_t stride, size_t offset,
                        const uint32_t* __restrict__ tok_cell, const uint16_t* __restrict__ tok_t,
                        uint32_t n, size_t kofs_layer, const float* __restrict__ q,
                        float* __restrict__ sc, float* __restrict__ best) {
  const uint32_t kvh = blockIdx.y, G = s.q_heads / s.kv_heads, d = s.head_dim;
  const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t tok = blockIdx.x * (blockDim.x >> 5) + warp;
  if (tok >= n) return;
  const T* K = reinterpret_cast<const T*>(base + size_t(tok_cell[tok]) * stride + offset) +
               kofs_layer + size_t(kvh) * s.page_tokens * d + size_t(tok_t[tok]) * d;
  float b = -INFINITY;
  for (uint32_t h = 0; h < G; ++h) {
    const float* qh = q + (size_t(kvh) * G + h) * d;
    float part = 0.0f;
    for (uint32_t j = lane; j < d; j += 32) part += qh[j] * ToF(K[j]);
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    part *= s.scale;
    if (lane == 0) sc[(size_t(kvh) * G + h) * n + tok] = part;
    b = fmaxf(b, part);
  }
  if (lane == 0) best[size_t(kvh) * n + tok] = b;
}

constexpr int kSelectThreads = 1024;

// Exclusive prefix sum of x over the block's threads in thread order (blockDim.x a multiple
// of 32); *total gets the block's sum. warp_sums: 32 words of shared memory. Every thread of
// the block calls it; it ends with a barrier, so warp_sums is free again on return.
__device__ __forceinline__ uint32_t BlockExclusiveSum(uint32_t x, uint32_t* warp_sums,
                                                      uint32_t* total) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t inc = x;  // inclusive within the warp
  for (uint32_t off = 1; off < 32; off <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += y;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the warp totals
    uint32_t w = lane < nwarps ? warp_sums[lane] : 0u;
    for (uint32_t off = 1; off < 32; off <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const uint32_t before = warp == 0 ? 0u : warp_sums[warp - 1];
  *total = warp_sums[nwarps - 1];
  __syncthreads();
  return before + inc - x;
}

FM_KERNEL void L2Select(const float* __restrict__ best, uint32_t n, uint32_t k,
                        uint32_t* __restrict__ sel) {
  const uint32_t kvh = blockIdx.x;
  const float* b = best + size_t(kvh) * n;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t prefix, prefix_mask, remaining;
  if (threadIdx.x == 0) prefix = 0, prefix_mask = 0, remaining = k;
  __syncthreads();
  // Radix select from the most significant byte: the k-th largest key.
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t key = OrderKey(b[i]);
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t cum = 0, digit = 0;
      for (int dgt = 255; dgt >= 0; --dgt) {
        if (cum + hist[dgt] >= remaining) {
          digit = static_cast<uint32_t>(dgt);
          break;
        }
        cum += hist[dgt];
      }
      remaining -= cum;  // how many of the keys equal to the final threshold to take
      prefix |= digit << shift;
      prefix_mask |= 0xffu << shift;
    }
    __syncthreads();
  }
  const uint32_t tau = prefix, take_equal = remaining;
  // Compact in index order: all keys > tau, and the first take_equal keys == tau.
  __shared__ uint32_t warp_sums[32];
  __shared__ uint32_t base_out, base_eq;
  if (threadIdx.x == 0) base_out = 0, base_eq = 0;
  __syncthreads();
  for (uint32_t start = 0; start < n; start += blockDim.x) {
    const uint32_t i = start + threadIdx.x;
    const uint32_t key = i < n ? OrderKey(b[i]) : 0;
    const uint32_t is_eq = (i < n && key == tau) ? 1u : 0u;
    uint32_t eq_total, kept;
    const uint32_t eq_rank = BlockExclusiveSum(is_eq, warp_sums, &eq_total);
    const uint32_t keep =
        (i < n && (key > tau || (is_eq && base_eq + eq_rank < take_equal))) ? 1u : 0u;
    const uint32_t pos = BlockExclusiveSum(keep, warp_sums, &kept);
    if (keep) sel[size_t(kvh) * k + base_out + pos] = i;
    __syncthreads();
    if (threadIdx.x == 0) base_out += kept, base_eq += eq_total;
    __syncthreads();
  }
}

template <typename T>
FM_KERNEL void L2Attend(L2Shape s, const uint8_t* __restrict__ base, size_t stride, size_t offset,
                        const uint32_t* __restrict__ tok_cell, const uint16_t* __restrict__ tok_t,
                        uint32_t n, uint32_t k, size_t vofs_layer, const float* __restrict__ sc,
                        const uint32_t* __restrict__ sel, float* __restrict__ out,
                        float* __restrict__ lse) {
  const uint32_t kvh = blockIdx.x, G = s.q_heads / s.kv_heads, d = s.head_dim;
  FM_SHARED_FLOATS(sm);
  float* m = sm;       // [G]
  float* sum = m + G;  // [G]
  const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const uint32_t* sl = sel + size_t(kvh) * k;
  for (uint32_t h = warp; h < G; h += nwarps) {
    const float* sh = sc + (size_t(kvh) * G + h) * n;
    float mx = -INFINITY;
    for (uint32_t r = lane; r < k; r += 32) mx = fmaxf(mx, sh[sl[r]]);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sm_ = 0.0f;
    for (uint32_t r = lane; r < k; r += 32) sm_ += __expf(sh[sl[r]] - mx);
    for (int off = 16; off > 0; off >>= 1) sm_ += __shfl_xor_sync(0xffffffffu, sm_, off);
    if (lane == 0) m[h] = mx, sum[h] = sm_;
  }
  __syncthreads();
  for (uint32_t e = threadIdx.x; e < G * d; e += blockDim.x) {
    const uint32_t h = e / d, j = e % d;
    const float* sh = sc + (size_t(kvh) * G + h) * n;
    float acc = 0.0f;
    for (uint32_t r = 0; r < k; ++r) {
      const uint32_t tok = sl[r];
      const T* V = reinterpret_cast<const T*>(base + size_t(tok_cell[tok]) * stride + offset) +
                   vofs_layer + size_t(kvh) * s.page_tokens * d + size_t(tok_t[tok]) * d;
      acc += __expf(sh[tok] - m[h]) * ToF(V[j]);
    }
    out[(size_t(kvh) * G + h) * d + j] = acc / sum[h];
    if (lse && j == 0) lse[size_t(kvh) * G + h] = m[h] + logf(sum[h]);
  }
}

FM_KERNEL void MergeStates(uint32_t heads, uint32_t d, const float* __restrict__ oa,
                           const float* __restrict__ la, const float* __restrict__ ob,
                           const float* __restrict__ lb, float* __restrict__ o,
                           float* __restrict__ l) {
  for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < heads * d;
       e += gridDim.x * blockDim.x) {
    const uint32_t h = e / d;
    const float a = la[h], b = lb[h], mx = fmaxf(a, b);
    const float wa = a == -INFINITY ? 0.0f : __expf(a - mx),
                wb = b == -INFINITY ? 0.0f : __expf(b - mx);
    const float sum = wa + wb;
    o[e] = sum == 0.0f ? 0.0f : (wa * oa[e] + wb * ob[e]) / sum;
    if (e % d == 0) l[h] = sum == 0.0f ? -INFINITY : mx + logf(sum);
  }
}

}  // namespace fm::kernels::cuda_level2
