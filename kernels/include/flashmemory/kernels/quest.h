// Quest selection (Tang et al., 2024): per page and KV head, the elementwise min and max of
// K bound q.k for every token of the page: q.k <= sum_j max(q_j * min_j, q_j * max_j).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

// Floats of one page's bounds: [layer][kv_head][min|max][head_dim].
inline size_t QuestBoundsFloats(const AttentionShape& s) {
  return size_t{s.layers} * s.kv_heads * 2 * s.head_dim;
}

// Computes the bounds of one page (its first `valid` tokens) into out.
KernelStatus QuestBounds(const AttentionShape& s, const uint8_t* page_payload, uint32_t valid,
                         float* out);

// For one layer's query q [q_heads][head_dim]: score[i] = max over query heads of the upper
// bound of scale * q_h . k over page i, for `pages` pages whose bounds are at
// bounds + i * QuestBoundsFloats(s).
KernelStatus QuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                             const float* bounds, uint64_t pages, float* score);

namespace reference {
KernelStatus QuestBounds(const AttentionShape& s, const uint8_t* page_payload, uint32_t valid,
                         float* out);
KernelStatus QuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                             const float* bounds, uint64_t pages, float* score);
}  // namespace reference

}  // namespace fm::kernels
