// Level-2 selection inside the resident set (per layer): each KV head's query group scores
// every resident token by max over its query heads of scale * q_h . k_t, keeps the top-k
// tokens (ties: lower page-list index, then lower token), and attends only to those.
// topk >= resident tokens is dense attention over the resident set.
#pragma once

#include <cstdint>

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

inline constexpr uint32_t kMaxLevel2TopK = 2048;

// out [q_heads][head_dim], lse [q_heads] (may be null). topk in [1, kMaxLevel2TopK].
KernelStatus TopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                        uint32_t layer, uint32_t topk, const float* q, float* out, float* lse);

namespace reference {
KernelStatus TopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                        uint32_t layer, uint32_t topk, const float* q, float* out, float* lse);
}  // namespace reference

}  // namespace fm::kernels
