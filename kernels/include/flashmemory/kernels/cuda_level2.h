// CUDA level-2 top-k decode (same contract and tie rule as TopKDecode) and the merge of two
// partial attention states (as MergeAttentionStates; outputs must not alias inputs). Pool,
// q, out and lse are device memory; the page list is host memory. TopKDecode returns when
// done; MergeAttentionStates once queued on `stream` (a cudaStream_t; null = default).
#pragma once

#include "flashmemory/kernels/level2.h"

namespace fm::kernels {

KernelStatus CudaTopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                            uint32_t layer, uint32_t topk, const float* q, float* out, float* lse,
                            void* stream);
KernelStatus CudaMergeAttentionStates(uint32_t heads, uint32_t head_dim, const float* o_a,
                                      const float* lse_a, const float* o_b, const float* lse_b,
                                      float* o, float* lse, void* stream);

}  // namespace fm::kernels
