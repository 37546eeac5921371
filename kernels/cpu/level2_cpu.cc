// CPU level-2 top-k decode: SIMD token scores, partial sort, SIMD attention over the kept
// tokens; one task per KV head on the kernel thread pool.
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/level2_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "flashmemory/kernels/level2.h"

#include "kernels/cpu/simd_util-inl.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

template <typename T>
void KvHeadT(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t layer,
             uint32_t topk, uint32_t kvh, const float* q, float* out, float* lse) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t d = s.head_dim, g = s.q_heads / s.kv_heads;
  const float scale = s.Scale();
  std::vector<const T*> krow, vrow;
  for (uint32_t i = 0; i < pages.count; ++i) {
    const T* cell = reinterpret_cast<const T*>(
        pool.base + size_t{pages.cells[i]} * pool.cell_stride + pool.cell_offset);
    for (uint32_t t = 0; t < pages.valid[i]; ++t) {
      krow.push_back(cell + s.BlockElemOffset(layer, 0, kvh) + size_t{t} * d);
      vrow.push_back(cell + s.BlockElemOffset(layer, 1, kvh) + size_t{t} * d);
    }
  }
  const size_t n = krow.size();
  std::vector<float> sc(size_t{g} * n), best(n, -std::numeric_limits<float>::infinity());
  const float* qg = q + size_t{kvh} * g * d;
  for (size_t i = 0; i < n; ++i)
    for (uint32_t h = 0; h < g; ++h) {
      auto acc = hn::Zero(df);
      for (size_t j = 0; j < d; j += N)
        acc = hn::MulAdd(hn::LoadU(df, qg + size_t{h} * d + j), LoadAsF32(df, krow[i] + j), acc);
      const float v = hn::GetLane(hn::SumOfLanes(df, acc)) * scale;
      sc[size_t{h} * n + i] = v;
      best[i] = std::max(best[i], v);
    }
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  const size_t k = std::min<size_t>(topk, n);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](uint32_t a, uint32_t b) {
    return best[a] != best[b] ? best[a] > best[b] : a < b;
  });
  std::vector<float> p(size_t{g} * k), m(g, -std::numeric_limits<float>::infinity()), sum(g, 0.0f);
  for (uint32_t h = 0; h < g; ++h) {
    for (size_t r = 0; r < k; ++r) m[h] = std::max(m[h], sc[size_t{h} * n + order[r]]);
    for (size_t r = 0; r < k; ++r)
      sum[h] += (p[size_t{h} * k + r] = std::exp(sc[size_t{h} * n + order[r]] - m[h]));
  }
  float* og = out + size_t{kvh} * g * d;
  std::fill(og, og + size_t{g} * d, 0.0f);
  for (size_t r = 0; r < k; ++r) {
    const T* v = vrow[order[r]];
    for (size_t j = 0; j < d; j += N) {
      const auto x = LoadAsF32(df, v + j);
      for (uint32_t h = 0; h < g; ++h) {
        float* o = og + size_t{h} * d + j;
        hn::StoreU(hn::MulAdd(hn::Set(df, p[size_t{h} * k + r]), x, hn::LoadU(df, o)), df, o);
      }
    }
  }
  for (uint32_t h = 0; h < g; ++h) {
    const auto inv = hn::Set(df, 1.0f / sum[h]);
    for (size_t j = 0; j < d; j += N)
      hn::StoreU(hn::Mul(hn::LoadU(df, og + size_t{h} * d + j), inv), df, og + size_t{h} * d + j);
    if (lse) lse[size_t{kvh} * g + h] = m[h] + std::log(sum[h]);
  }
}

void KvHead(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t layer,
            uint32_t topk, uint32_t kvh, const float* q, float* out, float* lse) {
  switch (s.dtype) {
    case ElemType::kF32:
      return KvHeadT<float>(s, pool, pages, layer, topk, kvh, q, out, lse);
    case ElemType::kF16:
      return KvHeadT<hwy::float16_t>(s, pool, pages, layer, topk, kvh, q, out, lse);
    case ElemType::kBf16:
      return KvHeadT<hwy::bfloat16_t>(s, pool, pages, layer, topk, kvh, q, out, lse);
  }
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

HWY_EXPORT(KvHead);

KernelStatus TopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                        uint32_t layer, uint32_t topk, const float* q, float* out, float* lse) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  if (topk == 0 || topk > kMaxLevel2TopK) return KernelStatus::kInvalidShape;
  if (pages.count == 0) return KernelStatus::kEmptyPageList;
  for (uint32_t i = 0; i < pages.count; ++i)
    if (pages.cells[i] >= pool.num_cells || pages.valid[i] == 0 || pages.valid[i] > s.page_tokens)
      return KernelStatus::kBadPageIndex;
  auto fn = HWY_DYNAMIC_DISPATCH(KvHead);
  ThreadPool::Default().ParallelFor(
      s.kv_heads, [&](uint32_t kvh) { fn(s, pool, pages, layer, topk, kvh, q, out, lse); });
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
