// CPU paged decode attention: Highway SIMD compiled for every x86 target (AVX-512, AVX2,
// SSE4, scalar) and dispatched at run time, on the kernel thread pool.
//
// Per unit (sequence, KV head, page range) the GQA group's query heads share every K and
// V row load: scores for the page's tokens, an online-softmax update, then the V
// accumulation, all on a 16-32 KiB page block that stays in L1/L2.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/paged_decode_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "flashmemory/kernels/attention.h"

HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

template <typename T>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    const hn::Rebind<T, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, p));
  }
}

constexpr uint32_t kHeadBlock = 4;  // query heads sharing one K/V row load

template <typename T>
void AttendUnitT(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t page_begin,
                 uint32_t page_end, uint32_t layer, uint32_t kv_head, const float* HWY_RESTRICT q, float* HWY_RESTRICT out,
                 float* HWY_RESTRICT lse) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim, P = s.page_tokens;
  const float scale = s.Scale();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Per head: running max m, running sum l, accumulator acc[d]; scores of one page.
  HWY_ALIGN float m[64], l[64];
  float* acc = out;  // accumulate in place, normalise at the end
  std::vector<float> scores_buf(size_t{G} * P + N);
  float* scores = scores_buf.data();
  for (uint32_t h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0;
  }
  std::memset(acc, 0, sizeof(float) * G * d);
  const size_t kofs = s.BlockElemOffset(layer, 0, kv_head), vofs = s.BlockElemOffset(layer, 1, kv_head);

  for (uint32_t pi = page_begin; pi < page_end; ++pi) {
    const uint8_t* cell = pool.base + size_t{pages.cells[pi]} * pool.cell_stride + pool.cell_offset;
    const T* HWY_RESTRICT kb = reinterpret_cast<const T*>(cell) + kofs;
    const T* HWY_RESTRICT vb = reinterpret_cast<const T*>(cell) + vofs;
    const uint32_t valid = pages.valid[pi];
    // 1. Scores: scale * q_h . k_t, four heads per K row load.
    for (uint32_t hb = 0; hb < G; hb += kHeadBlock) {
      const uint32_t nh = std::min(kHeadBlock, G - hb);
      for (uint32_t t = 0; t < valid; ++t) {
        const T* krow = kb + size_t{t} * d;
        auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
        for (size_t j = 0; j < d; j += N) {
          const auto k = LoadF32(df, krow + j);
          a0 = hn::MulAdd(hn::LoadU(df, q + size_t{hb} * d + j), k, a0);
          if (nh > 1) a1 = hn::MulAdd(hn::LoadU(df, q + size_t{hb + 1} * d + j), k, a1);
          if (nh > 2) a2 = hn::MulAdd(hn::LoadU(df, q + size_t{hb + 2} * d + j), k, a2);
          if (nh > 3) a3 = hn::MulAdd(hn::LoadU(df, q + size_t{hb + 3} * d + j), k, a3);
        }
        scores[size_t{hb} * P + t] = hn::GetLane(hn::SumOfLanes(df, a0)) * scale;
        if (nh > 1) scores[size_t{hb + 1} * P + t] = hn::GetLane(hn::SumOfLanes(df, a1)) * scale;
        if (nh > 2) scores[size_t{hb + 2} * P + t] = hn::GetLane(hn::SumOfLanes(df, a2)) * scale;
        if (nh > 3) scores[size_t{hb + 3} * P + t] = hn::GetLane(hn::SumOfLanes(df, a3)) * scale;
      }
    }
    // 2. Online softmax: new max, rescale the running state, exponentiate this page's scores.
    HWY_ALIGN float corr[64];
    for (uint32_t h = 0; h < G; ++h) {
      float* sh = scores + size_t{h} * P;
      float pm = kNegInf;
      for (uint32_t t = 0; t < valid; ++t) pm = std::max(pm, sh[t]);
      const float mn = std::max(m[h], pm);
      corr[h] = m[h] == kNegInf ? 0.0f : std::exp(m[h] - mn);
      m[h] = mn;
      const auto vm = hn::Set(df, mn);
      auto vsum = hn::Zero(df);
      uint32_t t = 0;
      for (; t + N <= valid; t += N) {
        const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, sh + t), vm));
        hn::StoreU(e, df, sh + t);
        vsum = hn::Add(vsum, e);
      }
      float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
      for (; t < valid; ++t) sum += (sh[t] = std::exp(sh[t] - mn));
      l[h] = l[h] * corr[h] + sum;
    }
    // 3. acc_h = corr_h * acc_h + sum_t p_h[t] v_t, four heads per V row load.
    for (uint32_t hb = 0; hb < G; hb += kHeadBlock) {
      const uint32_t nh = std::min(kHeadBlock, G - hb);
      const float* p0 = scores + size_t{hb} * P;
      const float* p1 = p0 + (nh > 1 ? P : 0);
      const float* p2 = p0 + (nh > 2 ? 2 * P : 0);
      const float* p3 = p0 + (nh > 3 ? 3 * P : 0);
      for (size_t j = 0; j < d; j += N) {
        float* o0 = acc + size_t{hb} * d + j;
        auto a0 = hn::Mul(hn::LoadU(df, o0), hn::Set(df, corr[hb]));
        auto a1 = nh > 1 ? hn::Mul(hn::LoadU(df, o0 + d), hn::Set(df, corr[hb + 1])) : hn::Zero(df);
        auto a2 = nh > 2 ? hn::Mul(hn::LoadU(df, o0 + 2 * d), hn::Set(df, corr[hb + 2])) : hn::Zero(df);
        auto a3 = nh > 3 ? hn::Mul(hn::LoadU(df, o0 + 3 * d), hn::Set(df, corr[hb + 3])) : hn::Zero(df);
        for (uint32_t t = 0; t < valid; ++t) {
          const auto v = LoadF32(df, vb + size_t{t} * d + j);
          a0 = hn::MulAdd(hn::Set(df, p0[t]), v, a0);
          a1 = hn::MulAdd(hn::Set(df, p1[t]), v, a1);
          a2 = hn::MulAdd(hn::Set(df, p2[t]), v, a2);
          a3 = hn::MulAdd(hn::Set(df, p3[t]), v, a3);
        }
        hn::StoreU(a0, df, o0);
        if (nh > 1) hn::StoreU(a1, df, o0 + d);
        if (nh > 2) hn::StoreU(a2, df, o0 + 2 * d);
        if (nh > 3) hn::StoreU(a3, df, o0 + 3 * d);
      }
    }
  }
  for (uint32_t h = 0; h < G; ++h) {
    const auto inv = hn::Set(df, 1.0f / l[h]);
    for (size_t j = 0; j < d; j += N) hn::StoreU(hn::Mul(hn::LoadU(df, acc + size_t{h} * d + j), inv), df, acc + size_t{h} * d + j);
    lse[h] = m[h] + std::log(l[h]);
  }
}

void AttendUnit(const AttentionShape& s, const PagePool& pool, const PageList& pages, uint32_t page_begin,
                uint32_t page_end, uint32_t layer, uint32_t kv_head, const float* q, float* out, float* lse) {
  switch (s.dtype) {
    case ElemType::kF32: return AttendUnitT<float>(s, pool, pages, page_begin, page_end, layer, kv_head, q, out, lse);
    case ElemType::kF16:
      return AttendUnitT<hwy::float16_t>(s, pool, pages, page_begin, page_end, layer, kv_head, q, out, lse);
    case ElemType::kBf16:
      return AttendUnitT<hwy::bfloat16_t>(s, pool, pages, page_begin, page_end, layer, kv_head, q, out, lse);
  }
}

// Sums 64-bit words over every byte of the given ranges: a streaming-read anchor.
uint64_t StreamSum(const uint8_t* p, size_t bytes) {
  const hn::ScalableTag<uint64_t> du;
  const size_t N = hn::Lanes(du);
  auto a0 = hn::Zero(du), a1 = hn::Zero(du), a2 = hn::Zero(du), a3 = hn::Zero(du);
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  size_t n = bytes / 8, i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = hn::Add(a0, hn::LoadU(du, w + i));
    a1 = hn::Add(a1, hn::LoadU(du, w + i + N));
    a2 = hn::Add(a2, hn::LoadU(du, w + i + 2 * N));
    a3 = hn::Add(a3, hn::LoadU(du, w + i + 3 * N));
  }
  uint64_t sum = hn::GetLane(hn::SumOfLanes(du, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
  for (; i < n; ++i) sum += w[i];
  return sum;
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <atomic>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

HWY_EXPORT(AttendUnit);
HWY_EXPORT(StreamSum);

const char* CpuTargetName() {
  int64_t t = static_cast<int64_t>(hwy::SupportedTargets()) & HWY_TARGETS;
  return hwy::TargetName(t & -t);  // the best (lowest-bit) compiled target this CPU runs
}

uint64_t StreamReadSum(const uint8_t* p, size_t bytes) { return HWY_DYNAMIC_DISPATCH(StreamSum)(p, bytes); }

KernelStatus RunPagedDecode(const DecodePlan& plan, const PagePool& pool, const DecodeItem* items, size_t n_items) {
  const AttentionShape& s = plan.shape;
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim;
  for (size_t i = 0; i < n_items; ++i) {
    if (items[i].seq >= plan.seqs.size() || items[i].layer >= s.layers) return KernelStatus::kInvalidShape;
  }
  // Units of every item; split units write partial states, merged afterwards.
  std::vector<uint32_t> first(plan.seqs.size() + 1, 0);
  for (const auto& u : plan.units) ++first[u.seq + 1];
  for (size_t i = 1; i < first.size(); ++i) first[i] += first[i - 1];
  std::vector<std::pair<uint32_t, uint32_t>> tasks;  // (item, unit)
  for (uint32_t i = 0; i < n_items; ++i)
    for (uint32_t u = first[items[i].seq]; u < first[items[i].seq + 1]; ++u) tasks.push_back({i, u});
  const size_t slot = size_t{G} * d;
  std::vector<float> partial_out(plan.num_partials ? n_items * plan.num_partials * slot : 0);
  std::vector<float> partial_lse(plan.num_partials ? n_items * plan.num_partials * G : 0);
  std::vector<float> final_lse(n_items * s.q_heads);
  auto attend = HWY_DYNAMIC_DISPATCH(AttendUnit);
  ThreadPool& pool_threads = ThreadPool::Default();
  pool_threads.ParallelFor(static_cast<uint32_t>(tasks.size()), [&](uint32_t k) {
    const DecodeItem& it = items[tasks[k].first];
    const DecodePlan::Unit& u = plan.units[tasks[k].second];
    const float* q = it.q + size_t{u.kv_head} * slot;
    if (u.partial < 0) {
      attend(s, pool, plan.seqs[u.seq], u.page_begin, u.page_end, it.layer, u.kv_head, q,
             it.out + size_t{u.kv_head} * slot, final_lse.data() + size_t{tasks[k].first} * s.q_heads + size_t{u.kv_head} * G);
    } else {
      size_t p = size_t{tasks[k].first} * plan.num_partials + u.partial;
      attend(s, pool, plan.seqs[u.seq], u.page_begin, u.page_end, it.layer, u.kv_head, q,
             partial_out.data() + p * slot, partial_lse.data() + p * G);
    }
  });
  // Merge split units: consecutive units of one (sequence, KV head) own consecutive slots.
  if (plan.num_partials > 0) {
    std::vector<std::pair<uint32_t, uint32_t>> merges;  // (item, first unit of a split group)
    for (uint32_t i = 0; i < n_items; ++i)
      for (uint32_t u = first[items[i].seq]; u < first[items[i].seq + 1]; ++u) {
        const auto& unit = plan.units[u];
        if (unit.partial >= 0 && unit.page_begin == 0) merges.push_back({i, u});
      }
    pool_threads.ParallelFor(static_cast<uint32_t>(merges.size()), [&](uint32_t k) {
      const uint32_t i = merges[k].first;
      const DecodeItem& it = items[i];
      const auto& u0 = plan.units[merges[k].second];
      float* out = it.out + size_t{u0.kv_head} * slot;
      float* lse = final_lse.data() + size_t{i} * s.q_heads + size_t{u0.kv_head} * G;
      size_t p0 = size_t{i} * plan.num_partials + u0.partial;
      std::memcpy(out, partial_out.data() + p0 * slot, sizeof(float) * slot);
      std::memcpy(lse, partial_lse.data() + p0 * G, sizeof(float) * G);
      for (uint32_t u = merges[k].second + 1; u < plan.units.size(); ++u) {
        const auto& un = plan.units[u];
        if (un.seq != u0.seq || un.kv_head != u0.kv_head || un.partial < 0) break;
        size_t p = size_t{i} * plan.num_partials + un.partial;
        MergeAttentionStates(G, d, out, lse, partial_out.data() + p * slot, partial_lse.data() + p * G, out, lse);
      }
    });
  }
  for (size_t i = 0; i < n_items; ++i)
    if (items[i].lse) std::memcpy(items[i].lse, final_lse.data() + i * s.q_heads, sizeof(float) * s.q_heads);
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
