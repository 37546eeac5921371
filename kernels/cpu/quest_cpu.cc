// CPU Quest kernels: bounds with SIMD min/max per page, page scores with SIMD upper bounds,
// both with Highway runtime dispatch.
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/quest_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>

#include <algorithm>
#include <limits>

#include "flashmemory/kernels/quest.h"

#include "kernels/cpu/simd_util-inl.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

template <typename T>
void BoundsT(const AttentionShape& s, const uint8_t* page, uint32_t valid, float* out) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t d = s.head_dim;
  const T* p = reinterpret_cast<const T*>(page);
  for (uint32_t l = 0; l < s.layers; ++l)
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      const T* kb = p + s.BlockElemOffset(l, 0, h);
      float* mn = out + (size_t{l} * s.kv_heads + h) * 2 * d;
      for (size_t j = 0; j < d; j += N) {
        auto vmin = hn::Set(df, std::numeric_limits<float>::infinity());
        auto vmax = hn::Neg(vmin);
        for (uint32_t t = 0; t < valid; ++t) {
          const auto v = LoadAsF32(df, kb + size_t{t} * d + j);
          vmin = hn::Min(vmin, v);
          vmax = hn::Max(vmax, v);
        }
        hn::StoreU(vmin, df, mn + j);
        hn::StoreU(vmax, df, mn + d + j);
      }
    }
}

void Bounds(const AttentionShape& s, const uint8_t* page, uint32_t valid, float* out) {
  switch (s.dtype) {
    case ElemType::kF32:
      return BoundsT<float>(s, page, valid, out);
    case ElemType::kF16:
      return BoundsT<hwy::float16_t>(s, page, valid, out);
    case ElemType::kBf16:
      return BoundsT<hwy::bfloat16_t>(s, page, valid, out);
  }
}

void PageScores(const AttentionShape& s, uint32_t layer, const float* q, const float* bounds,
                uint64_t pages, float* score) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t d = s.head_dim, g = s.q_heads / s.kv_heads;
  const size_t stride = size_t{s.layers} * s.kv_heads * 2 * d;
  const float scale = s.Scale();
  for (uint64_t i = 0; i < pages; ++i) {
    float best = -std::numeric_limits<float>::infinity();
    for (uint32_t h = 0; h < s.q_heads; ++h) {
      const float* mn = bounds + i * stride + (size_t{layer} * s.kv_heads + h / g) * 2 * d;
      auto acc = hn::Zero(df);
      for (size_t j = 0; j < d; j += N) {
        const auto qv = hn::LoadU(df, q + size_t{h} * d + j);
        acc = hn::Add(acc, hn::Max(hn::Mul(qv, hn::LoadU(df, mn + j)),
                                   hn::Mul(qv, hn::LoadU(df, mn + d + j))));
      }
      best = std::max(best, hn::GetLane(hn::SumOfLanes(df, acc)) * scale);
    }
    score[i] = best;
  }
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

HWY_EXPORT(Bounds);
HWY_EXPORT(PageScores);

KernelStatus QuestBounds(const AttentionShape& s, const uint8_t* page, uint32_t valid, float* out) {
  if (s.Validate(nullptr) != KernelStatus::kOk) return KernelStatus::kInvalidShape;
  if (valid == 0 || valid > s.page_tokens) return KernelStatus::kBadPageIndex;
  HWY_DYNAMIC_DISPATCH(Bounds)(s, page, valid, out);
  return KernelStatus::kOk;
}

KernelStatus QuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                             const float* bounds, uint64_t pages, float* score) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  constexpr uint64_t kBlock = 1024;
  const uint64_t blocks = (pages + kBlock - 1) / kBlock;
  auto fn = HWY_DYNAMIC_DISPATCH(PageScores);
  const size_t stride = QuestBoundsFloats(s);
  ThreadPool::Default().ParallelFor(static_cast<uint32_t>(blocks), [&](uint32_t b) {
    const uint64_t begin = b * kBlock, n = std::min(pages, begin + kBlock) - begin;
    fn(s, layer, q, bounds + begin * stride, n, score + begin);
  });
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
