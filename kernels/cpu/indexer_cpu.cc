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

// Blocked scan (kKeyBlock chunks per block, dimension-major rows): lanes are chunks, so
// each head accumulates with one FMA per dimension and no cross-lane reduction. G heads at
// a time share each decoded row; heads past `heads` repeat the last one with weight 0.
template <uint32_t G>
void ScoreBlocksG(const IndexerShape& s, const float* HWY_RESTRICT q, const float* HWY_RESTRICT w,
                  const uint8_t* HWY_RESTRICT blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                  float* HWY_RESTRICT logits) {
  const DF df;
  const hn::Rebind<uint8_t, DF> d8;
  const hn::Rebind<uint16_t, DF> d16;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const size_t N = hn::Lanes(df);
  const uint32_t di = s.dim, H = s.heads;
  const auto sign = hn::Set(d16, 0x80), mag = hn::Set(d16, 0x7f);
  const auto zero = hn::Zero(df);
  HWY_ALIGN float lg[kKeyBlock];
  for (uint64_t b = b0; b < b1; ++b) {
    const uint8_t* HWY_RESTRICT base = blocks + b * KeyBlockBytes(di);
    const float* HWY_RESTRICT scales = reinterpret_cast<const float*>(base + size_t{di} * kKeyBlock);
    for (size_t sub = 0; sub < kKeyBlock; sub += N) {
      auto total = zero;
      for (uint32_t h = 0; h < H; h += G) {
        const float* qg[G];
        float wg[G];
        for (uint32_t k = 0; k < G; ++k) {
          qg[k] = q + size_t{std::min(h + k, H - 1)} * di;
          wg[k] = h + k < H ? w[h + k] : 0.0f;
        }
        hn::Vec<DF> acc[G];
        for (uint32_t k = 0; k < G; ++k) acc[k] = zero;
        for (uint32_t j = 0; j < di; ++j) {
          const auto raw = hn::PromoteTo(d16, hn::LoadU(d8, base + size_t{j} * kKeyBlock + sub));
          const auto bits =
              hn::Or(hn::ShiftLeft<8>(hn::And(raw, sign)), hn::ShiftLeft<7>(hn::And(raw, mag)));
          const auto kv = hn::PromoteTo(df, hn::BitCast(dh, bits));
          for (uint32_t k = 0; k < G; ++k) acc[k] = hn::MulAdd(hn::Set(df, qg[k][j]), kv, acc[k]);
        }
        for (uint32_t k = 0; k < G; ++k)
          total = hn::MulAdd(hn::Set(df, wg[k]), hn::Max(acc[k], zero), total);
      }
      // The fp16 detour scaled values by 2^-8; the chunk's scale is positive, so it commutes
      // with relu and applies once at the end.
      const auto sc = hn::Mul(hn::LoadU(df, scales + sub), hn::Set(df, 256.0f));
      hn::Store(hn::Mul(total, sc), df, lg + sub);
    }
    const uint64_t c0 = b * kKeyBlock;
    std::memcpy(logits + c0, lg, sizeof(float) * std::min<uint64_t>(kKeyBlock, chunks - c0));
  }
}

void ScoreBlocks(const IndexerShape& s, const float* HWY_RESTRICT q, const float* HWY_RESTRICT w,
                 const uint8_t* HWY_RESTRICT blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                 float* HWY_RESTRICT logits) {
  // Targets with 32 vector registers keep 16 accumulators; others 8 (or fewer heads).
  constexpr uint32_t kMaxG = HWY_MAX_BYTES >= 64 ? 16 : 8;
  if (s.heads <= 4) return ScoreBlocksG<4>(s, q, w, blocks, b0, b1, chunks, logits);
  if (s.heads <= 8 || kMaxG == 8) return ScoreBlocksG<8>(s, q, w, blocks, b0, b1, chunks, logits);
  return ScoreBlocksG<kMaxG>(s, q, w, blocks, b0, b1, chunks, logits);
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <numeric>

#include "kernels/cpu/cpu_kernels.h"
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

void PackIndexKeys(uint32_t dim, const uint8_t* keys, uint64_t first, uint64_t n,
                   uint8_t* blocks) {
  const size_t kb = size_t{dim} + 4;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t c = first + i;
    uint8_t* base = blocks + (c / kKeyBlock) * KeyBlockBytes(dim);
    const uint32_t slot = c % kKeyBlock;
    const uint8_t* key = keys + i * kb;
    for (uint32_t j = 0; j < dim; ++j) base[size_t{j} * kKeyBlock + slot] = key[j];
    std::memcpy(base + size_t{dim} * kKeyBlock + 4 * slot, key + dim, 4);
  }
}

void UnpackIndexKey(uint32_t dim, const uint8_t* blocks, uint64_t c, uint8_t* key) {
  const uint8_t* base = blocks + (c / kKeyBlock) * KeyBlockBytes(dim);
  const uint32_t slot = c % kKeyBlock;
  for (uint32_t j = 0; j < dim; ++j) key[j] = base[size_t{j} * kKeyBlock + slot];
  std::memcpy(key + dim, base + size_t{dim} * kKeyBlock + 4 * slot, 4);
}

HWY_EXPORT(ScoreBlocks);

KernelStatus ScoreKeyBlocks(const IndexerShape& s, const float* q, const float* w,
                            const uint8_t* const* blocks, uint64_t chunks, ScoreMath math,
                            float* logits) {
  KernelStatus st = s.Validate(nullptr);
  if (st != KernelStatus::kOk) return st;
  const bool fp16 = math == ScoreMath::kFast && Fp16ScoringAvailable();
  // fp16 products need q within fp16's range and precision: each head is scaled by a power
  // of two (exact) so that its largest |q| is in [1, 2), and its weight by the inverse.
  std::vector<float> qs, ws;
  std::vector<std::vector<uint32_t>> qp;
  if (fp16) {
    qs.assign(q, q + size_t{s.layers} * s.heads * s.dim);
    ws.assign(w, w + size_t{s.layers} * s.heads);
    for (size_t h = 0; h < ws.size(); ++h) {
      float mx = 0;
      for (uint32_t j = 0; j < s.dim; ++j) mx = std::max(mx, std::abs(qs[h * s.dim + j]));
      if (mx == 0 || !std::isfinite(mx)) continue;
      int e = 0;
      std::frexp(mx, &e);  // mx = f * 2^e, f in [0.5, 1)
      for (uint32_t j = 0; j < s.dim; ++j) qs[h * s.dim + j] = std::ldexp(qs[h * s.dim + j], 1 - e);
      ws[h] = std::ldexp(ws[h], e - 1);
    }
    for (uint32_t l = 0; l < s.layers; ++l)
      qp.push_back(Fp16QueryPairs(s, qs.data() + size_t{l} * s.heads * s.dim));
  }
  constexpr uint64_t kBlocksPerTask = 128;  // 4096 chunks
  const uint64_t nblocks = (chunks + kKeyBlock - 1) / kKeyBlock;
  const uint64_t tasks = (nblocks + kBlocksPerTask - 1) / kBlocksPerTask;
  auto fn = HWY_DYNAMIC_DISPATCH(ScoreBlocks);
  ThreadPool::Default().ParallelFor(static_cast<uint32_t>(tasks * s.layers), [&](uint32_t t) {
    const uint32_t l = static_cast<uint32_t>(t / tasks);
    const uint64_t b0 = (t % tasks) * kBlocksPerTask,
                   b1 = std::min(nblocks, b0 + kBlocksPerTask);
    const size_t qo = size_t{l} * s.heads * s.dim, wo = size_t{l} * s.heads;
    float* out = logits + size_t{l} * chunks;
    if (fp16)
      ScoreBlocksFp16(s, qp[l].data(), ws.data() + wo, blocks[l], b0, b1, chunks, out);
    else
      fn(s, q + qo, w + wo, blocks[l], b0, b1, chunks, out);
  });
  return KernelStatus::kOk;
}

std::string ScoreKeyBlocksPath(ScoreMath math) {
  if (math == ScoreMath::kFast && Fp16ScoringAvailable()) return "avx512fp16";
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);
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
