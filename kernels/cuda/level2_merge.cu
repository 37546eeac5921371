// CUDA level-2 top-k decode and the standalone merge of partial attention states.
//
// TopKDecode, per KV head: (1) a warp per resident token scores it for every query head of
// the group (best = max over heads); (2) one block finds the k-th largest best score with a
// 4-pass radix select on order-preserving keys and compacts the kept tokens in index order
// (ties: lower index first, as the reference); (3) one block runs softmax and the V sum over
// the kept tokens.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <vector>

#include "flashmemory/kernels/cuda_level2.h"
#include "kernels/cuda/device_util.cuh"

namespace fm::kernels {
namespace {

// Larger float -> larger unsigned key.
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct L2Shape {
  uint32_t q_heads, kv_heads, head_dim, page_tokens;
  float scale;
};

template <typename T>
__global__ void L2Scores(L2Shape s, const uint8_t* __restrict__ base, size_t stride, size_t offset,
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

__global__ void L2Select(const float* __restrict__ best, uint32_t n, uint32_t k,
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
  using Scan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint32_t base_out, base_eq;
  if (threadIdx.x == 0) base_out = 0, base_eq = 0;
  __syncthreads();
  for (uint32_t start = 0; start < n; start += blockDim.x) {
    const uint32_t i = start + threadIdx.x;
    const uint32_t key = i < n ? OrderKey(b[i]) : 0;
    const uint32_t is_eq = (i < n && key == tau) ? 1u : 0u;
    uint32_t eq_rank, eq_total;
    Scan(tmp).ExclusiveSum(is_eq, eq_rank, eq_total);
    __syncthreads();
    const uint32_t keep =
        (i < n && (key > tau || (is_eq && base_eq + eq_rank < take_equal))) ? 1u : 0u;
    uint32_t pos, kept;
    Scan(tmp).ExclusiveSum(keep, pos, kept);
    if (keep) sel[size_t(kvh) * k + base_out + pos] = i;
    __syncthreads();
    if (threadIdx.x == 0) base_out += kept, base_eq += eq_total;
    __syncthreads();
  }
}

template <typename T>
__global__ void L2Attend(L2Shape s, const uint8_t* __restrict__ base, size_t stride, size_t offset,
                         const uint32_t* __restrict__ tok_cell, const uint16_t* __restrict__ tok_t,
                         uint32_t n, uint32_t k, size_t vofs_layer, const float* __restrict__ sc,
                         const uint32_t* __restrict__ sel, float* __restrict__ out,
                         float* __restrict__ lse) {
  const uint32_t kvh = blockIdx.x, G = s.q_heads / s.kv_heads, d = s.head_dim;
  extern __shared__ float sm[];
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

__global__ void MergeStates(uint32_t heads, uint32_t d, const float* __restrict__ oa,
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

}  // namespace

KernelStatus CudaTopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                            uint32_t layer, uint32_t topk, const float* q, float* out, float* lse,
                            void* stream_ptr) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  if (topk == 0 || topk > kMaxLevel2TopK) return KernelStatus::kInvalidShape;
  if (pages.count == 0) return KernelStatus::kEmptyPageList;
  std::vector<uint32_t> tok_cell;
  std::vector<uint16_t> tok_t;
  for (uint32_t i = 0; i < pages.count; ++i) {
    if (pages.cells[i] >= pool.num_cells || pages.valid[i] == 0 || pages.valid[i] > s.page_tokens)
      return KernelStatus::kBadPageIndex;
    for (uint32_t t = 0; t < pages.valid[i]; ++t)
      tok_cell.push_back(pages.cells[i]), tok_t.push_back(t);
  }
  const uint32_t n = static_cast<uint32_t>(tok_cell.size()), k = std::min(topk, n);
  const uint32_t G = s.q_heads / s.kv_heads;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  uint32_t *d_cell = nullptr, *d_sel = nullptr;
  uint16_t* d_t = nullptr;
  float *d_sc = nullptr, *d_best = nullptr;
  bool ok = cudaMalloc(&d_cell, sizeof(uint32_t) * n) == cudaSuccess &&
            cudaMalloc(&d_t, sizeof(uint16_t) * n) == cudaSuccess &&
            cudaMalloc(&d_sc, sizeof(float) * n * s.q_heads) == cudaSuccess &&
            cudaMalloc(&d_best, sizeof(float) * n * s.kv_heads) == cudaSuccess &&
            cudaMalloc(&d_sel, sizeof(uint32_t) * k * s.kv_heads) == cudaSuccess;
  if (ok) {
    cudaMemcpyAsync(d_cell, tok_cell.data(), sizeof(uint32_t) * n, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(d_t, tok_t.data(), sizeof(uint16_t) * n, cudaMemcpyHostToDevice, stream);
    L2Shape ls{s.q_heads, s.kv_heads, s.head_dim, s.page_tokens, s.Scale()};
    const size_t kofs = size_t(layer) * 2 * s.kv_heads * s.page_tokens * s.head_dim;
    const size_t vofs = kofs + size_t(s.kv_heads) * s.page_tokens * s.head_dim;
    dim3 grid((n + 7) / 8, s.kv_heads);
    const size_t shm = sizeof(float) * 2 * G;
    switch (s.dtype) {
      case ElemType::kF32:
        L2Scores<float><<<grid, 256, 0, stream>>>(ls, pool.base, pool.cell_stride, pool.cell_offset,
                                                  d_cell, d_t, n, kofs, q, d_sc, d_best);
        L2Select<<<s.kv_heads, kSelectThreads, 0, stream>>>(d_best, n, k, d_sel);
        L2Attend<float><<<s.kv_heads, 256, shm, stream>>>(ls, pool.base, pool.cell_stride,
                                                          pool.cell_offset, d_cell, d_t, n, k, vofs,
                                                          d_sc, d_sel, out, lse);
        break;
      case ElemType::kF16:
        L2Scores<__half><<<grid, 256, 0, stream>>>(ls, pool.base, pool.cell_stride,
                                                   pool.cell_offset, d_cell, d_t, n, kofs, q, d_sc,
                                                   d_best);
        L2Select<<<s.kv_heads, kSelectThreads, 0, stream>>>(d_best, n, k, d_sel);
        L2Attend<__half><<<s.kv_heads, 256, shm, stream>>>(ls, pool.base, pool.cell_stride,
                                                           pool.cell_offset, d_cell, d_t, n, k,
                                                           vofs, d_sc, d_sel, out, lse);
        break;
      case ElemType::kBf16:
        L2Scores<__nv_bfloat16><<<grid, 256, 0, stream>>>(ls, pool.base, pool.cell_stride,
                                                          pool.cell_offset, d_cell, d_t, n, kofs, q,
                                                          d_sc, d_best);
        L2Select<<<s.kv_heads, kSelectThreads, 0, stream>>>(d_best, n, k, d_sel);
        L2Attend<__nv_bfloat16><<<s.kv_heads, 256, shm, stream>>>(ls, pool.base, pool.cell_stride,
                                                                  pool.cell_offset, d_cell, d_t, n,
                                                                  k, vofs, d_sc, d_sel, out, lse);
        break;
    }
    ok = cudaStreamSynchronize(stream) == cudaSuccess && cudaGetLastError() == cudaSuccess;
  }
  cudaFree(d_cell);
  cudaFree(d_t);
  cudaFree(d_sc);
  cudaFree(d_best);
  cudaFree(d_sel);
  return ok ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

KernelStatus CudaMergeAttentionStates(uint32_t heads, uint32_t head_dim, const float* o_a,
                                      const float* lse_a, const float* o_b, const float* lse_b,
                                      float* o, float* lse, void* stream) {
  if (heads == 0 || head_dim == 0) return KernelStatus::kInvalidShape;
  const uint32_t n = heads * head_dim;
  MergeStates<<<(n + 255) / 256, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      heads, head_dim, o_a, lse_a, o_b, lse_b, o, lse);
  return cudaGetLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

}  // namespace fm::kernels
