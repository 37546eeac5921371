// CPU indexer kernels: chunk scoring over fp8-e4m3 keys with Highway SIMD (runtime
// dispatch) on the kernel thread pool, and page selection.
//
// fp8-e4m3 decodes exactly through fp16: s.eeee.mmm placed as fp16 bits s.0eeee.mmm0000000
// is the same value times 2^-8 (for subnormals too), and fp16 -> fp32 is one instruction
// (F16C). The 2^8 is folded into the key's scale.
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/indexer_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "flashmemory/kernels/indexer.h"
#include "kernels/cpu/simd_util-inl.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Decodes di fp8 values at p into kf, times `mult`.
HWY_INLINE void DecodeKey(DF df, const uint8_t* HWY_RESTRICT p, uint32_t dim, float mult,
                          float* HWY_RESTRICT kf) {
  const hn::Rebind<uint8_t, DF> d8;
  const hn::Rebind<uint16_t, DF> d16;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const size_t N = hn::Lanes(df);
  const auto vm = hn::Set(df, mult);
  const auto sign = hn::Set(d16, 0x80), mag = hn::Set(d16, 0x7f);
  for (size_t j = 0; j < dim; j += N) {
    const auto b = hn::PromoteTo(d16, hn::LoadU(d8, p + j));
    const auto bits = hn::Or(hn::ShiftLeft<8>(hn::And(b, sign)), hn::ShiftLeft<7>(hn::And(b, mag)));
    hn::StoreU(hn::Mul(hn::PromoteTo(df, hn::BitCast(dh, bits)), vm), df, kf + j);
  }
}

// logits for chunks [c0, c1) of one layer.
void ScoreRange(const IndexerShape& s, const float* HWY_RESTRICT q, const float* HWY_RESTRICT w,
                const uint8_t* HWY_RESTRICT keys, uint64_t c0, uint64_t c1,
                float* HWY_RESTRICT logits) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const uint32_t di = s.dim, H = s.heads;
  const size_t kb = s.KeyBytes();
  HWY_ALIGN float k0[1024], k1[1024];
  std::memset(k1, 0, sizeof(float) * di);  // read (and ignored) when a range ends on an odd chunk
  for (uint64_t c = c0; c < c1; c += 2) {
    const bool two = c + 1 < c1;
    float sc0, sc1 = 0;
    std::memcpy(&sc0, keys + c * kb + di, 4);
    DecodeKey(df, keys + c * kb, di, sc0 * 256.0f, k0);
    if (two) {
      std::memcpy(&sc1, keys + (c + 1) * kb + di, 4);
      DecodeKey(df, keys + (c + 1) * kb, di, sc1 * 256.0f, k1);
      if (c + 10 <= c1) {  // keys a few chunks ahead
        for (size_t off = 0; off < 2 * kb; off += 64)
          __builtin_prefetch(keys + (c + 8) * kb + off, 0, 0);
      }
    }
    // Four heads x two chunks: eight FMA chains, then one transposing reduction per chunk.
    float l0 = 0, l1 = 0;
    HWY_ALIGN float d0[4], d1[4];
    for (uint32_t h = 0; h < H; h += 4) {
      const uint32_t nh = std::min(4u, H - h);
      const float* q0 = q + size_t{h} * di;
      const float* q1 = q0 + (nh > 1 ? di : 0);
      const float* q2 = q0 + (nh > 2 ? 2 * di : 0);
      const float* q3 = q0 + (nh > 3 ? 3 * di : 0);
      auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
      auto b0 = hn::Zero(df), b1 = hn::Zero(df), b2 = hn::Zero(df), b3 = hn::Zero(df);
      for (size_t j = 0; j < di; j += N) {
        const auto x = hn::Load(df, k0 + j), y = hn::Load(df, k1 + j);
        const auto u0 = hn::LoadU(df, q0 + j), u1 = hn::LoadU(df, q1 + j);
        const auto u2 = hn::LoadU(df, q2 + j), u3 = hn::LoadU(df, q3 + j);
        a0 = hn::MulAdd(u0, x, a0), a1 = hn::MulAdd(u1, x, a1), a2 = hn::MulAdd(u2, x, a2),
        a3 = hn::MulAdd(u3, x, a3);
        b0 = hn::MulAdd(u0, y, b0), b1 = hn::MulAdd(u1, y, b1), b2 = hn::MulAdd(u2, y, b2),
        b3 = hn::MulAdd(u3, y, b3);
      }
      Sum4(df, a0, a1, a2, a3, d0);
      Sum4(df, b0, b1, b2, b3, d1);
      for (uint32_t k = 0; k < nh; ++k) {
        l0 += w[h + k] * std::max(d0[k], 0.0f);
        l1 += w[h + k] * std::max(d1[k], 0.0f);
      }
    }
    logits[c] = l0;
    if (two) logits[c + 1] = l1;
  }
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <numeric>

#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

HWY_EXPORT(ScoreRange);

KernelStatus IndexerQuery(const IndexerShape& s, const IndexerLayerWeights& wts, const float* h,
                          uint64_t pos, float* q, float* w) {
  // Once per prediction and small next to the chunk scan: the plain loops suffice.
  return reference::IndexerQuery(s, wts, h, pos, q, w);
}

KernelStatus ScoreChunks(const IndexerShape& s, const float* q, const float* w,
                         const uint8_t* const* keys, uint64_t chunks, float* logits) {
  KernelStatus st = s.Validate(nullptr);
  if (st != KernelStatus::kOk) return st;
  constexpr uint64_t kBlock = 4096;  // chunks per task
  const uint64_t blocks = (chunks + kBlock - 1) / kBlock;
  auto fn = HWY_DYNAMIC_DISPATCH(ScoreRange);
  ThreadPool::Default().ParallelFor(static_cast<uint32_t>(blocks * s.layers), [&](uint32_t t) {
    const uint32_t l = static_cast<uint32_t>(t / blocks);
    const uint64_t b = t % blocks;
    fn(s, q + size_t{l} * s.heads * s.dim, w + size_t{l} * s.heads, keys[l], b * kBlock,
       std::min(chunks, (b + 1) * kBlock), logits + size_t{l} * chunks);
  });
  return KernelStatus::kOk;
}

KernelStatus SelectPages(uint32_t layers, const float* logits, uint64_t chunks,
                         const SelectParams& p, std::vector<ScoredPageOut>* out) {
  out->clear();
  if (layers == 0 || p.chunk_tokens == 0 || p.page_tokens == 0 ||
      p.page_tokens % p.chunk_tokens != 0)
    return KernelStatus::kInvalidShape;
  const uint64_t per_page = p.page_tokens / p.chunk_tokens;
  if (p.total_pages == 0 || chunks > p.total_pages * per_page) return KernelStatus::kInvalidShape;
  std::vector<uint32_t> kept(p.total_pages, 0);
  std::vector<float> best(p.total_pages, 0.0f);
  for (uint64_t c = 0; c < chunks; ++c) {
    float sc = 0;
    for (uint32_t l = 0; l < layers; ++l) {
      const float sig = 1.0f / (1.0f + std::exp(-logits[size_t{l} * chunks + c]));
      sc = p.combine == LayerCombine::kMax ? std::max(sc, sig) : sc + sig / layers;
    }
    const uint64_t page = c / per_page;
    kept[page] += sc > p.theta;
    best[page] = std::max(best[page], sc);
  }
  const uint64_t sink = std::min<uint64_t>(p.sink, p.total_pages);
  const uint64_t tail_begin = p.total_pages - std::min<uint64_t>(p.tail, p.total_pages - sink);
  std::vector<uint64_t> cand;
  for (uint64_t pg = sink; pg < tail_begin; ++pg) cand.push_back(pg);
  auto better = [&](uint64_t a, uint64_t b) {
    if (kept[a] != kept[b]) return kept[a] > kept[b];
    if (best[a] != best[b]) return best[a] > best[b];
    return a > b;
  };
  const size_t k = std::min<size_t>(p.kmax, cand.size());
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), better);
  cand.resize(k);
  const float inf = std::numeric_limits<float>::infinity();
  for (uint64_t pg = 0; pg < sink; ++pg) out->push_back({pg, inf});
  for (uint64_t pg : cand) out->push_back({pg, static_cast<float>(kept[pg])});
  for (uint64_t pg = tail_begin; pg < p.total_pages; ++pg) out->push_back({pg, inf});
  std::sort(out->begin(), out->end(),
            [](const ScoredPageOut& a, const ScoredPageOut& b) { return a.page < b.page; });
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
