// CPU paged decode attention: Highway SIMD compiled for every x86 target (AVX-512, AVX2,
// SSE4, scalar) and dispatched at run time, on the kernel thread pool.
//
// Per unit (sequence, KV head, page range) the GQA group's query heads share every K and
// V row load: scores for the page's tokens, an online-softmax update, then the V
// accumulation, all on a 16-32 KiB page block that stays in L1/L2.
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/paged_decode_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>
#include <hwy/aligned_allocator.h>
#include <hwy/contrib/math/math-inl.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "flashmemory/kernels/attention.h"
#include "kernels/cpu/simd_util-inl.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// Loads 2N elements at p as two f32 vectors. bf16 comes out as (even, odd) elements: two
// ALU ops per 2N elements instead of four for a widening promote, so the FMA ports stay busy
// with FMAs. Callers keep q and the accumulators in the same per-2N-chunk even/odd order.
// Other types come out in natural order.
template <typename T>
HWY_INLINE void Load2(DF df, const T* HWY_RESTRICT p, hn::Vec<DF>& x0, hn::Vec<DF>& x1) {
  if constexpr (std::is_same_v<T, hwy::bfloat16_t>) {
    const hn::RebindToUnsigned<DF> du;
    const auto raw = hn::LoadU(du, reinterpret_cast<const uint32_t*>(p));
    x0 = hn::BitCast(df, hn::ShiftLeft<16>(raw));
    x1 = hn::BitCast(df, hn::And(raw, hn::Set(du, 0xFFFF0000u)));
  } else {
    x0 = LoadAsF32(df, p);
    x1 = LoadAsF32(df, p + hn::Lanes(df));
  }
}

// The element order Load2 produces, for vectors that live in it (q, accumulators): index of
// the natural element stored at position i of a 2N chunk.
template <typename T>
HWY_INLINE size_t ChunkSource(size_t i, size_t N) {
  if constexpr (std::is_same_v<T, hwy::bfloat16_t>) {
    return i < N ? 2 * i : 2 * (i - N) + 1;
  } else {
    return i;
  }
}

constexpr uint32_t kHeadBlock = 4;         // query heads sharing one K/V row load
constexpr size_t kL1PrefetchBytes = 1024;  // head of the next page's blocks, into L1
constexpr uint32_t kPrefetchPages = 3;  // prefetch distance in pages (measured: 2-3 beat 1 and 4)

// Software prefetch of a byte range into L2, spread over a loop: each Step() issues the next
// `per_step` cache lines. Pages are scattered cells and the hardware streamer stops at every
// 4 KiB boundary, so the next page is fetched while this one computes; spreading the
// prefetches keeps the fill buffers from stalling the FMA loops.
struct PrefetchStream {
  const uint8_t* p = nullptr;
  const uint8_t* end = nullptr;
  size_t per_step = 0;
  void Start(const uint8_t* begin, size_t bytes, size_t steps) {
    p = begin;
    end = begin ? begin + bytes : nullptr;
    per_step = steps ? std::max<size_t>(1, (bytes / 64 + steps - 1) / steps) : 0;
  }
  HWY_INLINE void Step() {
    if (p < end) {  // the last step may prefetch a few lines past `end`: harmless hints
      const uint8_t* stop = p + per_step * 64;
      do {
        __builtin_prefetch(p, 0, 2);
        p += 64;
      } while (p < stop);
    }
  }
};

// Running state of one (item, KV head): the GQA group's scaled queries (in Load2 order),
// accumulators [GB * 4][d], running max m and sum l per head.
struct GroupState {
  float* qs;
  float* acc;
  float* m;
  float* l;
};

inline size_t GroupStateFloats(uint32_t GB, uint32_t d) {
  return size_t{GB} * kHeadBlock * (2 * d + 2);
}

inline GroupState StateAt(float* base, uint32_t GB, uint32_t d) {
  GroupState st;
  st.qs = base;
  st.acc = st.qs + size_t{GB} * kHeadBlock * d;
  st.m = st.acc + size_t{GB} * kHeadBlock * d;
  st.l = st.m + size_t{GB} * kHeadBlock;
  return st;
}

template <typename T>
void InitGroupT(const AttentionShape& s, const float* HWY_RESTRICT q, GroupState st) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim, GB = (G + kHeadBlock - 1) / kHeadBlock;
  const float scale = s.Scale();
  std::memset(st.qs, 0, sizeof(float) * GB * kHeadBlock * d * 2);
  const size_t D2 = d / (2 * N) * (2 * N);  // whole 2N chunks (Load2 order), then a natural tail
  for (uint32_t h = 0; h < G; ++h) {
    for (size_t c = 0; c < D2; c += 2 * N)
      for (size_t i = 0; i < 2 * N; ++i)
        st.qs[size_t{h} * d + c + i] = q[size_t{h} * d + c + ChunkSource<T>(i, N)] * scale;
    for (size_t j = D2; j < d; ++j) st.qs[size_t{h} * d + j] = q[size_t{h} * d + j] * scale;
  }
  for (uint32_t h = 0; h < GB * kHeadBlock; ++h)
    st.m[h] = -std::numeric_limits<float>::infinity(), st.l[h] = 0;
}

template <typename T>
void FinishGroupT(const AttentionShape& s, GroupState st, float* HWY_RESTRICT out,
                  float* HWY_RESTRICT lse) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim;
  const size_t D2 = d / (2 * N) * (2 * N);
  for (uint32_t h = 0; h < G; ++h) {
    const float inv = 1.0f / st.l[h];
    const float* a = st.acc + size_t{h} * d;
    float* o = out + size_t{h} * d;
    for (size_t c = 0; c < D2; c += 2 * N)
      for (size_t i = 0; i < 2 * N; ++i) o[c + ChunkSource<T>(i, N)] = a[c + i] * inv;
    for (size_t j = D2; j < d; ++j) o[j] = a[j] * inv;
    lse[h] = st.m[h] + std::log(st.l[h]);
  }
}

// One page for one (layer, KV head): scores, online-softmax update and V accumulation for
// the group's query heads, four at a time (the group is padded with zero queries), two
// tokens or two d-chunks at a time so eight independent FMA chains hide FMA latency.
// nk/nv (may be null): the K and V blocks of a page ahead, prefetched while this computes.
template <typename T>
void AttendPageT(const AttentionShape& s, const T* HWY_RESTRICT kb, const T* HWY_RESTRICT vb,
                 uint32_t valid, GroupState st, float* HWY_RESTRICT sc, const uint8_t* nk,
                 const uint8_t* nv, size_t next_bytes) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim, P = s.page_tokens;
  const uint32_t GB = (G + kHeadBlock - 1) / kHeadBlock;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const size_t D2 = d / (2 * N) * (2 * N);
  const float* qs = st.qs;
  float* acc = st.acc;
  float* m = st.m;
  float* l = st.l;
  HWY_ALIGN float corr[64 + kHeadBlock];
  PrefetchStream pf;
  for (uint32_t hb = 0; hb < GB; ++hb) {
    pf.Start(hb == 0 ? nk : nullptr, next_bytes, (valid + 1) / 2);
    const float* q0 = qs + size_t{hb} * kHeadBlock * d;
    float* scb = sc + size_t{hb} * P * kHeadBlock;
    // 1. Scores of two tokens at a time: 8 accumulators, 4 query loads shared.
    uint32_t t = 0;
    for (; t + 2 <= valid; t += 2) {
      pf.Step();
      const T* k0 = kb + size_t{t} * d;
      const T* k1 = k0 + d;
      auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
      auto b0 = hn::Zero(df), b1 = hn::Zero(df), b2 = hn::Zero(df), b3 = hn::Zero(df);
      size_t j = 0;
      for (; j < D2; j += 2 * N) {
        hn::Vec<DF> x0, x1, y0, y1;
        Load2(df, k0 + j, x0, x1);
        Load2(df, k1 + j, y0, y1);
        const float* w = q0 + j;
        auto w0 = hn::LoadU(df, w), w1 = hn::LoadU(df, w + d), w2 = hn::LoadU(df, w + 2 * d),
             w3 = hn::LoadU(df, w + 3 * d);
        a0 = hn::MulAdd(w0, x0, a0), a1 = hn::MulAdd(w1, x0, a1), a2 = hn::MulAdd(w2, x0, a2),
        a3 = hn::MulAdd(w3, x0, a3);
        b0 = hn::MulAdd(w0, y0, b0), b1 = hn::MulAdd(w1, y0, b1), b2 = hn::MulAdd(w2, y0, b2),
        b3 = hn::MulAdd(w3, y0, b3);
        w0 = hn::LoadU(df, w + N), w1 = hn::LoadU(df, w + d + N), w2 = hn::LoadU(df, w + 2 * d + N);
        w3 = hn::LoadU(df, w + 3 * d + N);
        a0 = hn::MulAdd(w0, x1, a0), a1 = hn::MulAdd(w1, x1, a1), a2 = hn::MulAdd(w2, x1, a2),
        a3 = hn::MulAdd(w3, x1, a3);
        b0 = hn::MulAdd(w0, y1, b0), b1 = hn::MulAdd(w1, y1, b1), b2 = hn::MulAdd(w2, y1, b2),
        b3 = hn::MulAdd(w3, y1, b3);
      }
      for (; j < d; j += N) {
        const auto x0 = LoadAsF32(df, k0 + j), x1 = LoadAsF32(df, k1 + j);
        const auto w0 = hn::LoadU(df, q0 + j), w1 = hn::LoadU(df, q0 + d + j);
        const auto w2 = hn::LoadU(df, q0 + 2 * d + j), w3 = hn::LoadU(df, q0 + 3 * d + j);
        a0 = hn::MulAdd(w0, x0, a0), a1 = hn::MulAdd(w1, x0, a1), a2 = hn::MulAdd(w2, x0, a2),
        a3 = hn::MulAdd(w3, x0, a3);
        b0 = hn::MulAdd(w0, x1, b0), b1 = hn::MulAdd(w1, x1, b1), b2 = hn::MulAdd(w2, x1, b2),
        b3 = hn::MulAdd(w3, x1, b3);
      }
      Sum4(df, a0, a1, a2, a3, scb + size_t{t} * kHeadBlock);
      Sum4(df, b0, b1, b2, b3, scb + size_t{t + 1} * kHeadBlock);
    }
    if (t < valid) {
      const T* k0 = kb + size_t{t} * d;
      auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
      size_t j = 0;
      for (; j < D2; j += 2 * N) {
        hn::Vec<DF> x0, x1;
        Load2(df, k0 + j, x0, x1);
        const float* w = q0 + j;
        a0 = hn::MulAdd(hn::LoadU(df, w), x0, a0), a1 = hn::MulAdd(hn::LoadU(df, w + d), x0, a1);
        a2 = hn::MulAdd(hn::LoadU(df, w + 2 * d), x0, a2),
        a3 = hn::MulAdd(hn::LoadU(df, w + 3 * d), x0, a3);
        a0 = hn::MulAdd(hn::LoadU(df, w + N), x1, a0),
        a1 = hn::MulAdd(hn::LoadU(df, w + d + N), x1, a1);
        a2 = hn::MulAdd(hn::LoadU(df, w + 2 * d + N), x1, a2),
        a3 = hn::MulAdd(hn::LoadU(df, w + 3 * d + N), x1, a3);
      }
      for (; j < d; j += N) {
        const auto x0 = LoadAsF32(df, k0 + j);
        a0 = hn::MulAdd(hn::LoadU(df, q0 + j), x0, a0);
        a1 = hn::MulAdd(hn::LoadU(df, q0 + d + j), x0, a1);
        a2 = hn::MulAdd(hn::LoadU(df, q0 + 2 * d + j), x0, a2);
        a3 = hn::MulAdd(hn::LoadU(df, q0 + 3 * d + j), x0, a3);
      }
      Sum4(df, a0, a1, a2, a3, scb + size_t{t} * kHeadBlock);
    }
    // 2. Online softmax over this page for the four heads of the block.
    float* mb = m + hb * kHeadBlock;
    float* cb = corr + hb * kHeadBlock;
    HWY_ALIGN float mx[kHeadBlock] = {kNegInf, kNegInf, kNegInf, kNegInf};
    {
      const size_t n = size_t{valid} * kHeadBlock;
      size_t i = 0;
      if (N >= kHeadBlock && n >= N) {
        auto vmax = hn::Set(df, kNegInf);
        for (; i + N <= n; i += N) vmax = hn::Max(vmax, hn::LoadU(df, scb + i));
        StoreBlockMax(df, vmax, mx);
      }
      for (; i < n; ++i) mx[i % kHeadBlock] = std::max(mx[i % kHeadBlock], scb[i]);
    }
    HWY_ALIGN float pat[hn::MaxLanes(df) < 4 ? 4 : hn::MaxLanes(df)];
    for (uint32_t k = 0; k < kHeadBlock; ++k) {
      const float mn = std::max(mb[k], mx[k]);
      cb[k] = mb[k] == kNegInf ? 0.0f : std::exp(mb[k] - mn);
      mb[k] = mn;
    }
    float sums[kHeadBlock] = {0, 0, 0, 0};
    size_t i = 0;
    const size_t n = size_t{valid} * kHeadBlock;
    if (N >= kHeadBlock) {
      for (size_t k = 0; k < N; ++k) pat[k] = mb[k % kHeadBlock];
      const auto vm = hn::Load(df, pat);
      auto vs = hn::Zero(df);
      for (; i + N <= n; i += N) {
        const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, scb + i), vm));
        hn::StoreU(e, df, scb + i);
        vs = hn::Add(vs, e);
      }
      HWY_ALIGN float vsum[4];
      StoreBlockSum(df, vs, vsum);
      for (uint32_t k = 0; k < kHeadBlock; ++k) sums[k] = vsum[k];
    }
    for (; i < n; ++i) sums[i % kHeadBlock] += (scb[i] = std::exp(scb[i] - mb[i % kHeadBlock]));
    for (uint32_t k = 0; k < kHeadBlock; ++k)
      l[hb * kHeadBlock + k] = l[hb * kHeadBlock + k] * cb[k] + sums[k];
    // 3. acc = corr * acc + sum_t p[t] v_t, two d-chunks at a time (8 accumulators).
    float* ab = acc + size_t{hb} * kHeadBlock * d;
    const auto c0 = hn::Set(df, cb[0]), c1 = hn::Set(df, cb[1]), c2 = hn::Set(df, cb[2]),
               c3 = hn::Set(df, cb[3]);
    pf.Start(hb == 0 ? nv : nullptr, next_bytes, size_t{valid} * ((d + 2 * N - 1) / (2 * N)));
    size_t j = 0;
    for (; j < D2; j += 2 * N) {
      auto a0 = hn::Mul(hn::LoadU(df, ab + j), c0), a1 = hn::Mul(hn::LoadU(df, ab + d + j), c1);
      auto a2 = hn::Mul(hn::LoadU(df, ab + 2 * d + j), c2),
           a3 = hn::Mul(hn::LoadU(df, ab + 3 * d + j), c3);
      auto e0 = hn::Mul(hn::LoadU(df, ab + j + N), c0),
           e1 = hn::Mul(hn::LoadU(df, ab + d + j + N), c1);
      auto e2 = hn::Mul(hn::LoadU(df, ab + 2 * d + j + N), c2),
           e3 = hn::Mul(hn::LoadU(df, ab + 3 * d + j + N), c3);
      for (uint32_t tt = 0; tt < valid; ++tt) {
        pf.Step();  // measured: one line per token beats bursts every 8 tokens
        hn::Vec<DF> x0, x1;
        Load2(df, vb + size_t{tt} * d + j, x0, x1);
        const float* p = scb + size_t{tt} * kHeadBlock;
        const auto p0 = hn::Set(df, p[0]), p1 = hn::Set(df, p[1]), p2 = hn::Set(df, p[2]),
                   p3 = hn::Set(df, p[3]);
        a0 = hn::MulAdd(p0, x0, a0), a1 = hn::MulAdd(p1, x0, a1), a2 = hn::MulAdd(p2, x0, a2),
        a3 = hn::MulAdd(p3, x0, a3);
        e0 = hn::MulAdd(p0, x1, e0), e1 = hn::MulAdd(p1, x1, e1), e2 = hn::MulAdd(p2, x1, e2),
        e3 = hn::MulAdd(p3, x1, e3);
      }
      hn::StoreU(a0, df, ab + j), hn::StoreU(a1, df, ab + d + j),
          hn::StoreU(a2, df, ab + 2 * d + j);
      hn::StoreU(a3, df, ab + 3 * d + j);
      hn::StoreU(e0, df, ab + j + N), hn::StoreU(e1, df, ab + d + j + N),
          hn::StoreU(e2, df, ab + 2 * d + j + N);
      hn::StoreU(e3, df, ab + 3 * d + j + N);
    }
    for (; j < d; j += N) {
      auto a0 = hn::Mul(hn::LoadU(df, ab + j), c0), a1 = hn::Mul(hn::LoadU(df, ab + d + j), c1);
      auto a2 = hn::Mul(hn::LoadU(df, ab + 2 * d + j), c2),
           a3 = hn::Mul(hn::LoadU(df, ab + 3 * d + j), c3);
      for (uint32_t tt = 0; tt < valid; ++tt) {
        const auto x0 = LoadAsF32(df, vb + size_t{tt} * d + j);
        const float* p = scb + size_t{tt} * kHeadBlock;
        a0 = hn::MulAdd(hn::Set(df, p[0]), x0, a0), a1 = hn::MulAdd(hn::Set(df, p[1]), x0, a1);
        a2 = hn::MulAdd(hn::Set(df, p[2]), x0, a2), a3 = hn::MulAdd(hn::Set(df, p[3]), x0, a3);
      }
      hn::StoreU(a0, df, ab + j), hn::StoreU(a1, df, ab + d + j),
          hn::StoreU(a2, df, ab + 2 * d + j);
      hn::StoreU(a3, df, ab + 3 * d + j);
    }
  }
}

// One unit: the GQA group of `kv_head` over pages [page_begin, page_end).
template <typename T>
void AttendUnitT(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                 uint32_t page_begin, uint32_t page_end, uint32_t layer, uint32_t kv_head,
                 const float* HWY_RESTRICT q, float* HWY_RESTRICT out, float* HWY_RESTRICT lse) {
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim, GB = (G + kHeadBlock - 1) / kHeadBlock;
  hwy::AlignedFreeUniquePtr<float[]> work = hwy::AllocateAligned<float>(
      GroupStateFloats(GB, d) + size_t{GB} * s.page_tokens * kHeadBlock + 64);
  GroupState st = StateAt(work.get(), GB, d);
  float* sc = work.get() + GroupStateFloats(GB, d);
  InitGroupT<T>(s, q, st);
  const size_t kofs = s.BlockElemOffset(layer, 0, kv_head),
               vofs = s.BlockElemOffset(layer, 1, kv_head);
  for (uint32_t pi = page_begin; pi < page_end; ++pi) {
    const uint8_t* cell = pool.base + size_t{pages.cells[pi]} * pool.cell_stride + pool.cell_offset;
    const uint8_t* nk = nullptr;
    const uint8_t* nv = nullptr;
    size_t next_bytes = 0;
    if (pi + kPrefetchPages < page_end) {
      const uint32_t np = pi + kPrefetchPages;
      const uint8_t* next =
          pool.base + size_t{pages.cells[np]} * pool.cell_stride + pool.cell_offset;
      nk = next + kofs * sizeof(T);
      nv = next + vofs * sizeof(T);
      next_bytes = size_t{pages.valid[np]} * d * sizeof(T);
    }
    // The first lines of the next page's K and V blocks into L1 (the rest of it is already
    // on its way to L2): measured +3-5 points of streaming-read bandwidth.
    if (pi + 1 < page_end) {
      const uint8_t* nx =
          pool.base + size_t{pages.cells[pi + 1]} * pool.cell_stride + pool.cell_offset;
      for (size_t off = 0; off < kL1PrefetchBytes; off += 64) {
        __builtin_prefetch(nx + kofs * sizeof(T) + off, 0, 3);
        __builtin_prefetch(nx + vofs * sizeof(T) + off, 0, 3);
      }
    }
    AttendPageT<T>(s, reinterpret_cast<const T*>(cell) + kofs,
                   reinterpret_cast<const T*>(cell) + vofs, pages.valid[pi], st, sc, nk, nv,
                   next_bytes);
  }
  FinishGroupT<T>(s, st, out, lse);
}

void AttendUnit(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                uint32_t page_begin, uint32_t page_end, uint32_t layer, uint32_t kv_head,
                const float* q, float* out, float* lse) {
  switch (s.dtype) {
    case ElemType::kF32:
      return AttendUnitT<float>(s, pool, pages, page_begin, page_end, layer, kv_head, q, out, lse);
    case ElemType::kF16:
      return AttendUnitT<hwy::float16_t>(s, pool, pages, page_begin, page_end, layer, kv_head, q,
                                         out, lse);
    case ElemType::kBf16:
      return AttendUnitT<hwy::bfloat16_t>(s, pool, pages, page_begin, page_end, layer, kv_head, q,
                                          out, lse);
  }
}

// Runs `iters` rounds of ten independent fused multiply-adds on full vectors; returns the
// flops done (for the compute-peak anchor).
double FmaBurn(uint64_t iters) {
  const DF df;
  auto a0 = hn::Set(df, 1.0f), a1 = hn::Set(df, 1.1f), a2 = hn::Set(df, 1.2f),
       a3 = hn::Set(df, 1.3f);
  auto a4 = hn::Set(df, 1.4f), a5 = hn::Set(df, 1.5f), a6 = hn::Set(df, 1.6f),
       a7 = hn::Set(df, 1.7f);
  auto a8 = hn::Set(df, 1.8f), a9 = hn::Set(df, 1.9f);
  const auto m = hn::Set(df, 0.9999999f), b = hn::Set(df, 1e-8f);
  for (uint64_t i = 0; i < iters; ++i) {
    a0 = hn::MulAdd(a0, m, b), a1 = hn::MulAdd(a1, m, b), a2 = hn::MulAdd(a2, m, b);
    a3 = hn::MulAdd(a3, m, b), a4 = hn::MulAdd(a4, m, b), a5 = hn::MulAdd(a5, m, b);
    a6 = hn::MulAdd(a6, m, b), a7 = hn::MulAdd(a7, m, b), a8 = hn::MulAdd(a8, m, b);
    a9 = hn::MulAdd(a9, m, b);
  }
  const auto sum = hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)),
                           hn::Add(hn::Add(hn::Add(a4, a5), hn::Add(a6, a7)), hn::Add(a8, a9)));
  volatile float sink = hn::GetLane(sum);
  (void)sink;
  return double(iters) * 10 * 2 * hn::Lanes(df);
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
#include <chrono>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

HWY_EXPORT(AttendUnit);
HWY_EXPORT(StreamSum);
HWY_EXPORT(FmaBurn);

double MeasureFmaPeakGflops(double seconds) {
  ThreadPool& threads = ThreadPool::Default();
  auto burn = HWY_DYNAMIC_DISPATCH(FmaBurn);
  burn(1 << 20);  // warm up (and let the clock settle)
  const uint64_t iters = 1 << 22;
  double best = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
    std::vector<double> flops(threads.size());
    const auto t0 = std::chrono::steady_clock::now();
    threads.ParallelFor(threads.size(), [&](uint32_t i) { flops[i] = burn(iters); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double total = 0;
    for (double f : flops) total += f;
    best = std::max(best, total / s / 1e9);
  }
  return best;
}

const char* CpuTargetName() {
  int64_t t = static_cast<int64_t>(hwy::SupportedTargets()) & HWY_TARGETS;
  return hwy::TargetName(t & -t);  // the best (lowest-bit) compiled target this CPU runs
}

uint64_t StreamReadSum(const uint8_t* p, size_t bytes) {
  return HWY_DYNAMIC_DISPATCH(StreamSum)(p, bytes);
}

KernelStatus RunPagedDecode(const DecodePlan& plan, const PagePool& pool, const DecodeItem* items,
                            size_t n_items) {
  const AttentionShape& s = plan.shape;
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim;
  for (size_t i = 0; i < n_items; ++i) {
    if (items[i].seq >= plan.seqs.size() || items[i].layer >= s.layers)
      return KernelStatus::kInvalidShape;
  }
  // Units of every item; split units write partial states, merged afterwards.
  const std::vector<uint32_t>& first = plan.seq_units;
  std::vector<std::pair<uint32_t, uint32_t>> tasks;  // (item, unit)
  for (uint32_t i = 0; i < n_items; ++i)
    for (uint32_t u = first[items[i].seq]; u < first[items[i].seq + 1]; ++u)
      tasks.push_back({i, u});
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
             it.out + size_t{u.kv_head} * slot,
             final_lse.data() + size_t{tasks[k].first} * s.q_heads + size_t{u.kv_head} * G);
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
      for (uint32_t piece = 1; piece < u0.pieces; ++piece) {
        const size_t p = p0 + piece;
        MergeAttentionStates(G, d, out, lse, partial_out.data() + p * slot,
                             partial_lse.data() + p * G, out, lse);
      }
    });
  }
  for (size_t i = 0; i < n_items; ++i)
    if (items[i].lse)
      std::memcpy(items[i].lse, final_lse.data() + i * s.q_heads, sizeof(float) * s.q_heads);
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
