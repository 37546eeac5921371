// CUDA level-2 top-k decode and the standalone merge of partial attention states: the host
// side of the kernels in level2_kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

#include "flashmemory/kernels/cuda_level2.h"
#include "kernels/cuda/level2_kernel.cuh"

namespace fm::kernels {
using namespace cuda_level2;

KernelStatus CudaTopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                            uint32_t layer, uint32_t topk, const float* q, float* out, float* lse,
                            void* stream_ptr) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  if (topk == 0 || topk > kMaxLevel2TopK) return KernelStatus::kInvalidShape;
  if (pages.count == 0) return KernelStatus::kEmptyPageList;
  std::vector<uint32_t> tok_cell;
  std::vector<uint16_t> tok_t;
  if (KernelStatus st = ListTokens(s, pool, pages, &tok_cell, &tok_t); st != KernelStatus::kOk)
    return st;
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
    const size_t kofs = s.BlockElemOffset(layer, 0, 0), vofs = s.BlockElemOffset(layer, 1, 0);
    dim3 grid((n + kScoreWarps - 1) / kScoreWarps, s.kv_heads);
    const size_t shm = sizeof(float) * 2 * G;
    DispatchElemType(s.dtype, [&](auto elem) {
      using T = decltype(elem);
      L2Scores<T><<<grid, kScoreWarps * 32, 0, stream>>>(
          ls, pool.base, pool.cell_stride, pool.cell_offset, d_cell, d_t, n, kofs, q, d_sc, d_best);
      L2Select<<<s.kv_heads, kSelectThreads, 0, stream>>>(d_best, n, k, d_sel);
      L2Attend<T><<<s.kv_heads, kAttendThreads, shm, stream>>>(ls, pool.base, pool.cell_stride,
                                                               pool.cell_offset, d_cell, d_t, n, k,
                                                               vofs, d_sc, d_sel, out, lse);
    });
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
