// Scalar reference of the Quest bounds and page scores.
#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels/reference/elem.h"
#include "flashmemory/kernels/quest.h"

namespace fm::kernels::reference {

KernelStatus QuestBounds(const AttentionShape& s, const uint8_t* page, uint32_t valid, float* out) {
  if (s.Validate(nullptr) != KernelStatus::kOk) return KernelStatus::kInvalidShape;
  if (valid == 0 || valid > s.page_tokens) return KernelStatus::kBadPageIndex;
  const uint32_t d = s.head_dim;
  for (uint32_t l = 0; l < s.layers; ++l)
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      float* mn = out + (size_t{l} * s.kv_heads + h) * 2 * d;
      float* mx = mn + d;
      std::fill(mn, mn + d, std::numeric_limits<float>::infinity());
      std::fill(mx, mx + d, -std::numeric_limits<float>::infinity());
      const size_t base = s.BlockElemOffset(l, 0, h);
      for (uint32_t t = 0; t < valid; ++t)
        for (uint32_t j = 0; j < d; ++j) {
          const float v = LoadElem(s.dtype, page, base + size_t{t} * d + j);
          mn[j] = std::min(mn[j], v);
          mx[j] = std::max(mx[j], v);
        }
    }
  return KernelStatus::kOk;
}

KernelStatus QuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                             const float* bounds, uint64_t pages, float* score) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  const uint32_t d = s.head_dim, g = s.q_heads / s.kv_heads;
  const size_t stride = QuestBoundsFloats(s);
  for (uint64_t i = 0; i < pages; ++i) {
    float best = -std::numeric_limits<float>::infinity();
    for (uint32_t h = 0; h < s.q_heads; ++h) {
      const float* mn = bounds + i * stride + (size_t{layer} * s.kv_heads + h / g) * 2 * d;
      const float* mx = mn + d;
      float ub = 0;
      for (uint32_t j = 0; j < d; ++j) ub += std::max(q[h * d + j] * mn[j], q[h * d + j] * mx[j]);
      best = std::max(best, ub * s.Scale());
    }
    score[i] = best;
  }
  return KernelStatus::kOk;
}

}  // namespace fm::kernels::reference
