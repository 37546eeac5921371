// CPU indexer kernels: chunk scoring over fp8-e4m3 keys with Highway SIMD (runtime
// dispatch) on the kernel thread pool, and page selection.
//
// fp8-e4m3 decodes exactly through fp16: s.eeee.mmm placed as fp16 bits s.0eeee.mmm0000000
// is the same value times 2^-8 (for subnormals too), and fp16 -> fp32 is one instruction
// (F16C). The 2^8 is folded into the key's scale.
//
// The scan has three hand-written variants beside this portable one: for ScoreMath::kFast,
// AVX512-FP16 (indexer_fp16.cc) or else int16 VNNI (indexer_vnni.cc); and on AVX-512 CPUs
// with VBMI, an fp32 scan with byte-table decoding interleaved with the FMAs
// (indexer_vbmi.cc; bit-identical results).
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/indexer_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/aligned_allocator.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "flashmemory/kernels/indexer.h"
#include "kernels/cpu/simd_util-inl.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Blocked scan (kKeyBlock chunks per block, dimension-major rows): lanes are chunks, so
// each head accumulates with one FMA per dimension and no cross-lane reduction. A block is
// decoded once into fp32 (L1-resident), then a register tile of M heads x 2 vectors of
// chunks takes M + 2 loads per 2M FMAs. Heads past `heads` repeat the last one with weight
// 0. At most 16 lanes, so that a block holds a whole number of vector pairs.
using DB = hn::CappedTag<float, 16>;

template <uint32_t M>
void ScoreBlocksM(const IndexerShape& s, const float* HWY_RESTRICT q, const float* HWY_RESTRICT w,
                  const uint8_t* HWY_RESTRICT blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                  float* HWY_RESTRICT logits) {
  const DB df;
  const hn::Rebind<uint8_t, DB> d8;
  const hn::Rebind<uint16_t, DB> d16;
  const hn::Rebind<hwy::float16_t, DB> dh;
  const size_t N = hn::Lanes(df);
  const uint32_t di = s.dim, H = s.heads, groups = (H + M - 1) / M;
  // qt[g][j][k]: q of head g * M + k at dimension j, one pointer walking every broadcast.
  std::vector<float> qt(size_t{groups} * di * M);
  for (uint32_t g = 0; g < groups; ++g)
    for (uint32_t j = 0; j < di; ++j)
      for (uint32_t k = 0; k < M; ++k)
        qt[(size_t{g} * di + j) * M + k] = q[size_t{std::min(g * M + k, H - 1)} * di + j];
  auto kf_mem = hwy::AllocateAligned<float>(size_t{di} * kKeyBlock);
  float* HWY_RESTRICT kf = kf_mem.get();  // [di][32] decoded block
  const auto sign = hn::Set(d16, 0x80), mag = hn::Set(d16, 0x7f);
  const auto zero = hn::Zero(df);
  HWY_ALIGN float lg[kKeyBlock];
  for (uint64_t b = b0; b < b1; ++b) {
    const uint8_t* HWY_RESTRICT base = blocks + b * KeyBlockBytes(di);
    const float* HWY_RESTRICT scales = reinterpret_cast<const float*>(base + size_t{di} * kKeyBlock);
    for (size_t i = 0; i < size_t{di} * kKeyBlock; i += N) {
      const auto raw = hn::PromoteTo(d16, hn::LoadU(d8, base + i));
      const auto bits =
          hn::Or(hn::ShiftLeft<8>(hn::And(raw, sign)), hn::ShiftLeft<7>(hn::And(raw, mag)));
      hn::Store(hn::PromoteTo(df, hn::BitCast(dh, bits)), df, kf + i);
    }
    for (size_t sub = 0; sub < kKeyBlock; sub += 2 * N) {
      auto tot0 = zero, tot1 = zero;
      for (uint32_t g = 0; g < groups; ++g) {
        auto a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero,
             a7 = zero, c0 = zero, c1 = zero, c2 = zero, c3 = zero, c4 = zero, c5 = zero,
             c6 = zero, c7 = zero;
        const float* HWY_RESTRICT qj = qt.data() + size_t{g} * di * M;
        for (uint32_t j = 0; j < di; ++j, qj += M) {
          const auto k0 = hn::Load(df, kf + size_t{j} * kKeyBlock + sub);
          const auto k1 = hn::Load(df, kf + size_t{j} * kKeyBlock + sub + N);
#define FM_FMA(k)                                \
  if constexpr (M > k) {                         \
    const auto qk = hn::Set(df, qj[k]);          \
    a##k = hn::MulAdd(qk, k0, a##k);             \
    c##k = hn::MulAdd(qk, k1, c##k);             \
  }
          FM_FMA(0) FM_FMA(1) FM_FMA(2) FM_FMA(3) FM_FMA(4) FM_FMA(5) FM_FMA(6) FM_FMA(7)
#undef FM_FMA
        }
        const hn::Vec<DB> acc[8][2] = {{a0, c0}, {a1, c1}, {a2, c2}, {a3, c3},
                                       {a4, c4}, {a5, c5}, {a6, c6}, {a7, c7}};
        for (uint32_t k = 0; k < M; ++k) {
          const uint32_t h = g * M + k;
          const auto wk = hn::Set(df, h < H ? w[h] : 0.0f);
          tot0 = hn::MulAdd(wk, hn::Max(acc[k][0], zero), tot0);
          tot1 = hn::MulAdd(wk, hn::Max(acc[k][1], zero), tot1);
        }
      }
      // The fp16 detour scaled values by 2^-8; the chunk's scale is positive, so it commutes
      // with relu and applies once at the end.
      const auto k256 = hn::Set(df, 256.0f);
      hn::Store(hn::Mul(tot0, hn::Mul(hn::LoadU(df, scales + sub), k256)), df, lg + sub);
      hn::Store(hn::Mul(tot1, hn::Mul(hn::LoadU(df, scales + sub + N), k256)), df, lg + sub + N);
    }
    const uint64_t c0 = b * kKeyBlock;
    std::memcpy(logits + c0, lg, sizeof(float) * std::min<uint64_t>(kKeyBlock, chunks - c0));
  }
}

void ScoreBlocks(const IndexerShape& s, const float* HWY_RESTRICT q, const float* HWY_RESTRICT w,
                 const uint8_t* HWY_RESTRICT blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                 float* HWY_RESTRICT logits) {
  // 8 x 2 accumulators where there are 32 vector registers, 4 x 2 otherwise.
  constexpr uint32_t kM = HWY_MAX_BYTES >= 64 ? 8 : 4;
  if (s.heads <= 4) return ScoreBlocksM<4>(s, q, w, blocks, b0, b1, chunks, logits);
  return ScoreBlocksM<kM>(s, q, w, blocks, b0, b1, chunks, logits);
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <numeric>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/thread_pool.h"

namespace fm::kernels {

KernelStatus IndexerQuery(const IndexerShape& s, const IndexerLayerWeights& wts, const float* h,
                          uint64_t pos, float* q, float* w) {
  // Once per prediction and small next to the chunk scan: the plain loops suffice.
  return reference::IndexerQuery(s, wts, h, pos, q, w);
}

KernelStatus ScoreChunks(const IndexerShape& s, const float* q, const float* w,
                         const uint8_t* const* keys, uint64_t chunks, float* logits) {
  // Keys in the stored layout are packed into the scan layout first (the indexer keeps its
  // keys packed; this entry point serves one-off scans and tests).
  KernelStatus st = s.Validate(nullptr);
  if (st != KernelStatus::kOk) return st;
  std::vector<std::vector<uint8_t>> blocks;
  std::vector<const uint8_t*> ptrs;
  for (uint32_t l = 0; l < s.layers; ++l) {
    blocks.emplace_back(KeyBlocksBytes(s.dim, chunks), 0);
    PackIndexKeys(s.dim, keys[l], 0, chunks, blocks.back().data());
    ptrs.push_back(blocks.back().data());
  }
  return ScoreKeyBlocks(s, q, w, ptrs.data(), chunks, ScoreMath::kExact, logits);
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

bool MaxAbsExponent(const float* x, size_t n, int* e) {
  float mx = 0;
  for (size_t i = 0; i < n; ++i) mx = std::max(mx, std::abs(x[i]));
  if (!std::isfinite(mx)) return false;
  *e = 0;
  if (mx > 0) std::frexp(mx, e);
  return true;
}

namespace {

// The VBMI scan replaces the Highway kernel where that would run its AVX-512 target (not
// under SetSupportedTargetsForTest of a narrower one, so the tests cover both).
bool VbmiPath() {
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return (targets & -targets) <= HWY_AVX3 && VbmiScoringAvailable();
}
bool VnniPath() { return VbmiPath() && VnniScoringAvailable(); }

}  // namespace

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
      int e = 0;
      if (!MaxAbsExponent(qs.data() + h * s.dim, s.dim, &e)) continue;
      for (uint32_t j = 0; j < s.dim; ++j) qs[h * s.dim + j] = std::ldexp(qs[h * s.dim + j], 1 - e);
      ws[h] = std::ldexp(ws[h], e - 1);
    }
    for (uint32_t l = 0; l < s.layers; ++l)
      qp.push_back(Fp16QueryPairs(s, qs.data() + size_t{l} * s.heads * s.dim));
  }
  constexpr uint64_t kBlocksPerTask = 128;  // 4096 chunks
  const uint64_t nblocks = (chunks + kKeyBlock - 1) / kKeyBlock;
  const uint64_t tasks = (nblocks + kBlocksPerTask - 1) / kBlocksPerTask;
  // Without AVX512-FP16, the fast scan runs in int16 where the CPU has VNNI.
  std::vector<std::vector<uint32_t>> qi(s.layers);
  std::vector<std::vector<float>> wi(s.layers);
  bool vnni = math == ScoreMath::kFast && !fp16 && VnniPath();
  for (uint32_t l = 0; vnni && l < s.layers; ++l)
    vnni = IntQuery(s, q + size_t{l} * s.heads * s.dim, w + size_t{l} * s.heads, &qi[l], &wi[l]);
  auto fn = HWY_DYNAMIC_DISPATCH(ScoreBlocks);
  const bool vbmi = !fp16 && VbmiPath();
  ThreadPool::Default().ParallelFor(static_cast<uint32_t>(tasks * s.layers), [&](uint32_t t) {
    const uint32_t l = static_cast<uint32_t>(t / tasks);
    const uint64_t b0 = (t % tasks) * kBlocksPerTask,
                   b1 = std::min(nblocks, b0 + kBlocksPerTask);
    const size_t qo = size_t{l} * s.heads * s.dim, wo = size_t{l} * s.heads;
    float* out = logits + size_t{l} * chunks;
    if (fp16)
      ScoreBlocksFp16(s, qp[l].data(), ws.data() + wo, blocks[l], b0, b1, chunks, out);
    else if (vnni)
      ScoreBlocksInt(s, qi[l].data(), wi[l].data(), blocks[l], b0, b1, chunks, out);
    else if (vbmi)
      ScoreBlocksVbmi(s, q + qo, w + wo, blocks[l], b0, b1, chunks, out);
    else
      fn(s, q + qo, w + wo, blocks[l], b0, b1, chunks, out);
  });
  return KernelStatus::kOk;
}

std::string ScoreKeyBlocksPath(ScoreMath math) {
  if (math == ScoreMath::kFast && Fp16ScoringAvailable()) return "avx512fp16";
  if (math == ScoreMath::kFast && VnniPath()) return "avx512vnni";
  if (VbmiPath()) return "avx512vbmi";
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);
}

namespace {

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The smallest float x with Sigmoid(x) > theta (Sigmoid is non-decreasing in float
// arithmetic), so that the kept test needs no exp: -inf when every score passes, +inf when
// none does.
float KeptLogitBound(float theta) {
  float lo = -200.0f, hi = 200.0f;  // Sigmoid(-200) = 0, Sigmoid(200) = 1
  if (Sigmoid(lo) > theta) return -std::numeric_limits<float>::infinity();
  if (!(Sigmoid(hi) > theta)) return std::numeric_limits<float>::infinity();
  for (int i = 0; i < 400 && std::nextafter(lo, hi) != hi; ++i) {
    const float mid = lo + (hi - lo) / 2;
    if (mid == lo || mid == hi) break;
    (Sigmoid(mid) > theta ? hi : lo) = mid;
  }
  return hi;
}

}  // namespace

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
  if (p.combine == LayerCombine::kMax) {
    // max_l sigmoid(x_l) = sigmoid(max_l x_l): compare the largest logit with the kept bound
    // and take one sigmoid per page (1M tokens: 0.8M exps -> 16K).
    const float bound = KeptLogitBound(p.theta);
    for (uint64_t page = 0; page * per_page < chunks; ++page) {
      const uint64_t c1 = std::min(chunks, (page + 1) * per_page);
      float top = -std::numeric_limits<float>::infinity();
      uint32_t n = 0;
      for (uint64_t c = page * per_page; c < c1; ++c) {
        float x = -std::numeric_limits<float>::infinity();
        for (uint32_t l = 0; l < layers; ++l) x = std::max(x, logits[size_t{l} * chunks + c]);
        n += x >= bound;
        top = std::max(top, x);
      }
      kept[page] = n;
      best[page] = std::max(0.0f, Sigmoid(top));
    }
  } else {
    for (uint64_t c = 0; c < chunks; ++c) {
      float sc = 0;
      for (uint32_t l = 0; l < layers; ++l) sc += Sigmoid(logits[size_t{l} * chunks + c]) / layers;
      const uint64_t page = c / per_page;
      kept[page] += sc > p.theta;
      best[page] = std::max(best[page], sc);
    }
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
  const size_t kb = std::min<size_t>(k, static_cast<size_t>(double(p.kmax) * p.best_share));
  if (kb > 0) {
    std::partial_sort(cand.begin(), cand.begin() + kb, cand.end(), [&](uint64_t a, uint64_t b) {
      if (best[a] != best[b]) return best[a] > best[b];
      if (kept[a] != kept[b]) return kept[a] > kept[b];
      return a > b;
    });
  }
  std::partial_sort(cand.begin() + kb, cand.begin() + k, cand.end(), better);
  cand.resize(k);
  const float inf = std::numeric_limits<float>::infinity();
  for (uint64_t pg = 0; pg < sink; ++pg) out->push_back({pg, inf});
  // The quota's pages score above every kept count: chunks per page + their best chunk.
  for (size_t i = 0; i < cand.size(); ++i)
    out->push_back({cand[i], i < kb ? static_cast<float>(per_page) + best[cand[i]]
                                    : static_cast<float>(kept[cand[i]])});
  for (uint64_t pg = tail_begin; pg < p.total_pages; ++pg) out->push_back({pg, inf});
  std::sort(out->begin(), out->end(),
            [](const ScoredPageOut& a, const ScoredPageOut& b) { return a.page < b.page; });
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
