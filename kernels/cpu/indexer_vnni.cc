// The fast blocked index scan in 16-bit integers on AVX-512 CPUs with VNNI and VBMI but no
// AVX512-FP16 (Ice Lake, Sapphire/Emerald Rapids VMs that hide FP16, Zen 4):
// vpdpwssd does 32 multiply-adds per instruction at the issue rate of an fp32 FMA, which
// does 16. Measured on one core over a 1M-token history (16 heads x 128 dims): 670-690 ns
// per 32-chunk block against 1,000 for the fp32 scan (indexer_vbmi.cc).
//
// Keys: each fp8-e4m3 value v becomes round(16 v), at most 7,680 (the NaN code reads as
// 480, as through fp16): exact for |v| >= 1/2, within 1/32 below. CompressIndexKey scales
// every key so that its largest code is 448, so a key's rounding error is below 7e-5 of
// its largest element. q: per head, a power of two brings max |q| into [4096, 8192] and q is
// rounded to integers (relative error 2^-13 of that maximum). Products are summed exactly
// in int32 over 32 dimensions (32 x 8192 x 7680 < 2^31), then in fp32. The powers of two
// and the 1/16 fold into the head weights. Decoding is a byte-table lookup (vpermt2b) of the
// magnitude's two bytes, with the sign applied by a masked subtraction; rows j and j + 1
// of a chunk land in one 32-bit lane, as vpdpwssd pairs them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "common/codecs.h"
#include "kernels/cpu/avx512_intrinsics.h"
#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {

#if defined(__x86_64__)
namespace {

#define FM_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))

constexpr uint32_t kSegDims = 32;  // dimensions summed in int32 before widening to fp32

struct IntTables {
  alignas(64) uint8_t hi[128];  // high byte of round(16 |v|) for magnitude code v
  alignas(64) uint8_t lo[128];  // its low byte
  // unpacklo/hi_epi8 put byte 16 L + i of their input (i < 8 / i >= 8) in 16-bit lane
  // 8 L + i % 8 of output 0 / 1: byte 16 L + i must be row (i % 2), chunk
  // 16 (i / 8) + 4 L + (i % 8) / 2, so that 32-bit lane c of output 0 (1) holds chunk c
  // (16 + c) of rows j and j + 1.
  alignas(64) uint8_t perm[64];
  IntTables() {
    for (uint32_t v = 0; v < 128; ++v) {
      const float f = v == 0x7f ? 480.0f : Fp8E4m3ToFloat(static_cast<uint8_t>(v));
      const uint32_t m = static_cast<uint32_t>(std::nearbyint(f * 16));
      hi[v] = static_cast<uint8_t>(m >> 8);
      lo[v] = static_cast<uint8_t>(m);
    }
    for (uint32_t L = 0; L < 4; ++L)
      for (uint32_t i = 0; i < 16; ++i)
        perm[16 * L + i] = static_cast<uint8_t>((i % 2) * 32 + (i / 8) * 16 + 4 * L + (i % 8) / 2);
  }
};

const IntTables& Tables() {
  static const IntTables t;
  return t;
}

struct IntDecoder {
  __m512i hi0, hi1, lo0, lo1, perm, zero;
  FM_VNNI_TARGET IntDecoder() {
    const IntTables& t = Tables();
    hi0 = _mm512_load_si512(t.hi), hi1 = _mm512_load_si512(t.hi + 64);
    lo0 = _mm512_load_si512(t.lo), lo1 = _mm512_load_si512(t.lo + 64);
    perm = _mm512_load_si512(t.perm);
    zero = _mm512_setzero_si512();
  }
  // Rows j and j + 1 (64 bytes at `rows`) to two vectors of 16 (k[j][c], k[j + 1][c]) pairs.
  FM_VNNI_TARGET inline void RowPair(const uint8_t* rows, __m512i* out) const {
    const __m512i x = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(rows));
    const __m512i hi = _mm512_permutex2var_epi8(hi0, x, hi1);
    const __m512i lo = _mm512_permutex2var_epi8(lo0, x, lo1);
    const __m512i m0 = _mm512_unpacklo_epi8(lo, hi), m1 = _mm512_unpackhi_epi8(lo, hi);
    // The code's sign bit as bit 15 of the same 16-bit lane: negative lanes.
    const __mmask32 n0 = _mm512_movepi16_mask(_mm512_unpacklo_epi8(zero, x));
    const __mmask32 n1 = _mm512_movepi16_mask(_mm512_unpackhi_epi8(zero, x));
    out[0] = _mm512_mask_sub_epi16(m0, n0, zero, m0);
    out[1] = _mm512_mask_sub_epi16(m1, n1, zero, m1);
  }
};

constexpr uint32_t kHeadTile = 8;  // heads per register tile (fewer heads are padded)

// acc += the pairwise products of a and b, in place: GCC 12 copies every accumulator of the
// intrinsic's loop-carried form through another register once per iteration.
FM_VNNI_TARGET inline void DotPairs(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// Blocks [b0, b1) of one layer: qp[g][j / 2][k] = the int16 pair (q[j], q[j + 1]) of head
// g * kHeadTile + k; wq[h] = the head's weight with its powers of two folded in.
FM_VNNI_TARGET void ScanInt(const IndexerShape& s, const uint32_t* qp, const float* wq,
                            const uint8_t* blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                            float* logits) {
  const uint32_t di = s.dim, H = s.heads, groups = (H + kHeadTile - 1) / kHeadTile;
  const size_t block_bytes = KeyBlockBytes(di);
  // Two decoded blocks (di / 2 row pairs x 2 vectors each): the one scanned and the next.
  DecodeBuffers buffers(size_t{di} * 64);
  __m512i* cur = reinterpret_cast<__m512i*>(buffers.first());
  __m512i* nxt = reinterpret_cast<__m512i*>(buffers.second());
  const IntDecoder dec;
  for (uint32_t p = 0; p < di / 2; ++p)
    dec.RowPair(blocks + b0 * block_bytes + size_t{p} * 2 * kKeyBlock, cur + 2 * p);
  const __m512 fzero = _mm512_setzero_ps();
  alignas(64) float part[kHeadTile][2][16];
  alignas(64) float lg[kKeyBlock];
  const uint32_t total = groups * (di / 2);  // dimension pairs scanned per block
  for (uint64_t b = b0; b < b1; ++b) {
    const uint8_t* base = blocks + b * block_bytes;
    const float* scales = reinterpret_cast<const float*>(base + size_t{di} * kKeyBlock);
    const uint8_t* next = b + 1 < b1 ? base + block_bytes : nullptr;
    const uint8_t* after = base + 2 * block_bytes;  // prefetch hints may leave the array
    __m512 tot0 = fzero, tot1 = fzero;
    uint32_t pair = 0, steps = 0;  // the next block's row pairs decoded; dimension pairs done
    for (uint32_t g = 0; g < groups; ++g) {
      const uint32_t* qj = qp + size_t{g} * (di / 2) * kHeadTile;
      for (uint32_t seg = 0; seg < di / 2; seg += kSegDims / 2) {
        // The next block's row pairs due by the end of this segment, decoded ahead of its
        // multiply-adds (a branch-free inner loop keeps GCC's register allocation clean).
        steps += kSegDims / 2;
        const uint32_t due = next ? std::min(di / 2, (steps * (di / 2) + total - 1) / total) : 0;
        for (; pair < due; ++pair) {
          dec.RowPair(next + size_t{pair} * 2 * kKeyBlock, nxt + 2 * pair);
          _mm_prefetch(reinterpret_cast<const char*>(after + size_t{pair} * 2 * kKeyBlock),
                       _MM_HINT_T0);
        }
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
                a7 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, c6 = a0, c7 = a0;
        for (uint32_t p = seg; p < seg + kSegDims / 2; ++p, qj += kHeadTile) {
          const __m512i k0 = _mm512_load_si512(cur + 2 * p),
                        k1 = _mm512_load_si512(cur + 2 * p + 1);
#define FM_DP(k)                                                   \
  {                                                                \
    const __m512i qk = _mm512_set1_epi32(static_cast<int>(qj[k])); \
    DotPairs(a##k, k0, qk);                                        \
    DotPairs(c##k, k1, qk);                                        \
  }
          FM_DP(0) FM_DP(1) FM_DP(2) FM_DP(3) FM_DP(4) FM_DP(5) FM_DP(6) FM_DP(7)
#undef FM_DP
        }
        const __m512i acc[kHeadTile][2] = {{a0, c0}, {a1, c1}, {a2, c2}, {a3, c3},
                                           {a4, c4}, {a5, c5}, {a6, c6}, {a7, c7}};
        for (uint32_t k = 0; k < kHeadTile; ++k)
          for (int v = 0; v < 2; ++v) {
            __m512 f = _mm512_cvtepi32_ps(acc[k][v]);
            if (seg > 0) f = _mm512_add_ps(f, _mm512_load_ps(part[k][v]));
            _mm512_store_ps(part[k][v], f);
          }
      }
      for (uint32_t k = 0; k < kHeadTile; ++k) {
        const uint32_t h = g * kHeadTile + k;
        const __m512 wk = _mm512_set1_ps(h < H ? wq[h] : 0.0f);
        tot0 = _mm512_fmadd_ps(wk, _mm512_max_ps(_mm512_load_ps(part[k][0]), fzero), tot0);
        tot1 = _mm512_fmadd_ps(wk, _mm512_max_ps(_mm512_load_ps(part[k][1]), fzero), tot1);
      }
    }
    _mm512_store_ps(lg, _mm512_mul_ps(tot0, _mm512_loadu_ps(scales)));
    _mm512_store_ps(lg + 16, _mm512_mul_ps(tot1, _mm512_loadu_ps(scales + 16)));
    const uint64_t c0 = b * kKeyBlock;
    std::memcpy(logits + c0, lg, sizeof(float) * std::min<uint64_t>(kKeyBlock, chunks - c0));
    std::swap(cur, nxt);
  }
}

}  // namespace

bool VnniScoringAvailable() {
  static const bool available = VbmiScoringAvailable() && __builtin_cpu_supports("avx512vnni");
  return available;
}

bool IntQuery(const IndexerShape& s, const float* q, const float* w, std::vector<uint32_t>* qp,
              std::vector<float>* wq) {
  const uint32_t di = s.dim, H = s.heads;
  std::vector<int16_t> qi(size_t{H} * di);
  wq->assign(H, 0.0f);
  for (uint32_t h = 0; h < H; ++h) {
    int e = 0;  // max |q| = f 2^e, f in [0.5, 1): max |q 2^(13 - e)| <= 8192
    if (!MaxAbsExponent(q + size_t{h} * di, di, &e) || !std::isfinite(w[h])) return false;
    for (uint32_t j = 0; j < di; ++j)
      qi[size_t{h} * di + j] =
          static_cast<int16_t>(std::nearbyint(std::ldexp(q[size_t{h} * di + j], 13 - e)));
    (*wq)[h] = std::ldexp(w[h], e - 13 - 4);  // and the keys' 16
  }
  *qp =
      PackQueryPairs(s, kHeadTile, [&](uint32_t h, uint32_t j) { return qi[size_t{h} * di + j]; });
  return true;
}

void ScoreBlocksInt(const IndexerShape& s, const uint32_t* qp, const float* wq,
                    const uint8_t* blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                    float* logits) {
  if (b0 < b1) ScanInt(s, qp, wq, blocks, b0, b1, chunks, logits);
}

#else  // not x86-64

bool VnniScoringAvailable() { return false; }
bool IntQuery(const IndexerShape&, const float*, const float*, std::vector<uint32_t>*,
              std::vector<float>*) {
  return false;
}
void ScoreBlocksInt(const IndexerShape&, const uint32_t*, const float*, const uint8_t*, uint64_t,
                    uint64_t, uint64_t, float*) {}

#endif

}  // namespace fm::kernels
