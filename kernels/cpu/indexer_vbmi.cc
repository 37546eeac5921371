// The blocked index scan in fp32 on AVX-512 CPUs with VBMI (Ice Lake and later, Zen 4):
// the exact scan (and the fast one where AVX512-FP16 is missing).
//
// Decode: every e4m3 value is exact in bf16 (3 mantissa bits, exponents down to 2^-9), and
// bf16 is the top half of an fp32. Two 128-entry byte tables (vpermt2b) give the high and
// low bytes of the bf16 of the magnitude, the sign bit is or-ed into the high byte, and two
// rounds of unpacks with zero widen bytes to words to fp32: 10 shuffle-port uops per 64
// keys, where the portable route through fp16 takes about 30.
//
// Scan: the FMA tile of the portable kernel (8 heads x 32 chunks, 16 accumulators), with
// the next block decoded a row pair at a time between its FMAs and the block after that
// prefetched into L1 alongside. Measured on one core over a 1M-token history: 2,700-2,900
// cycles per 32-chunk block at 16 heads x 128 dims (2,048 is the FMA bound), against 3,900
// for a decode pass before each block's FMAs (the decode then waits on memory).
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "common/codecs.h"
#include "kernels/cpu/avx512_intrinsics.h"
#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {

#if defined(__x86_64__)
namespace {

#define FM_VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi")))

struct DecodeTables {
  alignas(64) uint8_t hi[128];  // high byte of the bf16 of magnitude v, times 2^-8
  alignas(64) uint8_t lo[128];  // its low byte
  // The unpacks put byte 16 L + 4 k + e of their input in element 4 L + e of output k
  // (L: 128-bit lane, e < 4): a first byte permutation makes output k hold 16 consecutive
  // keys: k = 0, 1 the two halves of row j, k = 2, 3 those of row j + 1.
  alignas(64) uint8_t perm[64];
  DecodeTables() {
    for (uint32_t v = 0; v < 128; ++v) {
      // Times 2^-8, as the fp16 route gives (the caller folds 2^8 into the chunk scale).
      // The NaN code 0x7f reads as 480 there (exponent 15 is finite in fp16), and so it
      // does here: a NaN key dimension must not turn a zero query weight into a NaN score.
      const float f = v == 0x7f ? 480.0f : Fp8E4m3ToFloat(static_cast<uint8_t>(v));
      const uint32_t bits = FloatBits(f * (1.0f / 256));
      hi[v] = static_cast<uint8_t>(bits >> 24);
      lo[v] = static_cast<uint8_t>(bits >> 16);
    }
    for (uint32_t L = 0; L < 4; ++L)
      for (uint32_t k = 0; k < 4; ++k)
        for (uint32_t e = 0; e < 4; ++e) perm[16 * L + 4 * k + e] = 16 * k + 4 * L + e;
  }
};

const DecodeTables& Tables() {
  static const DecodeTables t;
  return t;
}

// The decoder's constants, held in registers across a loop.
struct Decoder {
  __m512i hi0, hi1, lo0, lo1, perm, sign, zero;
  FM_VBMI_TARGET Decoder() {
    const DecodeTables& t = Tables();
    hi0 = _mm512_load_si512(t.hi), hi1 = _mm512_load_si512(t.hi + 64);
    lo0 = _mm512_load_si512(t.lo), lo1 = _mm512_load_si512(t.lo + 64);
    perm = _mm512_load_si512(t.perm);
    sign = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  }
  // Rows j and j + 1 (64 bytes at `rows`) to 64 floats at `out` (64-byte aligned).
  FM_VBMI_TARGET inline void RowPair(const uint8_t* rows, float* out) const {
    const __m512i x = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(rows));
    // Index bits above the seventh are ignored: the sign does not disturb the lookups.
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, x, hi1), x, sign,
                                                 0xF8);  // a | (b & c)
    const __m512i lo = _mm512_permutex2var_epi8(lo0, x, lo1);
    const __m512i w0 = _mm512_unpacklo_epi8(lo, hi), w1 = _mm512_unpackhi_epi8(lo, hi);
    _mm512_store_ps(out, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w0)));
    _mm512_store_ps(out + 16, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w0)));
    _mm512_store_ps(out + 32, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w1)));
    _mm512_store_ps(out + 48, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w1)));
  }
};

// Blocks [b0, b1) with a tile of M heads (4 or 8) x 32 chunks.
template <uint32_t M>
FM_VBMI_TARGET void ScanM(const IndexerShape& s, const float* q, const float* w,
                          const uint8_t* blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                          float* logits) {
  const uint32_t di = s.dim, H = s.heads, groups = (H + M - 1) / M;
  const size_t block_bytes = KeyBlockBytes(di);
  // qt[g][j][k]: q of head g * M + k at dimension j (heads past H repeat the last one; their
  // weight is 0), one pointer walking every broadcast.
  std::vector<float> qt(size_t{groups} * di * M);
  for (uint32_t g = 0; g < groups; ++g)
    for (uint32_t j = 0; j < di; ++j)
      for (uint32_t k = 0; k < M; ++k)
        qt[(size_t{g} * di + j) * M + k] = q[size_t{std::min(g * M + k, H - 1)} * di + j];
  // Two decoded blocks: the one being scanned and the next.
  DecodeBuffers buffers(size_t{di} * kKeyBlock * sizeof(float));
  float* cur = reinterpret_cast<float*>(buffers.first());
  float* nxt = reinterpret_cast<float*>(buffers.second());
  DecodeKeyRowsVbmi(blocks + b0 * block_bytes, di, cur);
  const Decoder dec;
  const __m512 zero = _mm512_setzero_ps(), k256 = _mm512_set1_ps(256.0f);
  alignas(64) float lg[kKeyBlock];
  // The next block's di / 2 row pairs spread over this block's groups * di / 2 steps.
  const uint32_t every = groups;
  for (uint64_t b = b0; b < b1; ++b) {
    const uint8_t* base = blocks + b * block_bytes;
    const float* scales = reinterpret_cast<const float*>(base + size_t{di} * kKeyBlock);
    const uint8_t* next = b + 1 < b1 ? base + block_bytes : nullptr;
    // Past b1 the prefetches are harmless hints (they may leave the array).
    const uint8_t* after = base + 2 * block_bytes;
    __m512 tot0 = zero, tot1 = zero;
    uint32_t pair = 0, wait = 0;  // the next block's next row pair; steps until it is due
    for (uint32_t g = 0; g < groups; ++g) {
      __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero,
             c0 = zero, c1 = zero, c2 = zero, c3 = zero, c4 = zero, c5 = zero, c6 = zero, c7 = zero;
      const float* qj = qt.data() + size_t{g} * di * M;
      for (uint32_t j = 0; j < di; j += 2) {
        if (next && wait-- == 0) {
          wait = every - 1;
          const size_t r = size_t{pair++} * 2 * kKeyBlock;  // byte offset of the pair
          dec.RowPair(next + r, nxt + r);
          _mm_prefetch(reinterpret_cast<const char*>(after + r), _MM_HINT_T0);
        }
        for (uint32_t jj = j; jj < j + 2; ++jj, qj += M) {
          const __m512 k0 = _mm512_load_ps(cur + size_t{jj} * kKeyBlock);
          const __m512 k1 = _mm512_load_ps(cur + size_t{jj} * kKeyBlock + 16);
#define FM_FMA(k)                            \
  if constexpr (M > k) {                     \
    const __m512 qk = _mm512_set1_ps(qj[k]); \
    a##k = _mm512_fmadd_ps(qk, k0, a##k);    \
    c##k = _mm512_fmadd_ps(qk, k1, c##k);    \
  }
          FM_FMA(0) FM_FMA(1) FM_FMA(2) FM_FMA(3) FM_FMA(4) FM_FMA(5) FM_FMA(6) FM_FMA(7)
#undef FM_FMA
        }
      }
      const __m512 acc[8][2] = {{a0, c0}, {a1, c1}, {a2, c2}, {a3, c3},
                                {a4, c4}, {a5, c5}, {a6, c6}, {a7, c7}};
      for (uint32_t k = 0; k < M; ++k) {
        const uint32_t h = g * M + k;
        const __m512 wk = _mm512_set1_ps(h < H ? w[h] : 0.0f);
        tot0 = _mm512_fmadd_ps(wk, _mm512_max_ps(acc[k][0], zero), tot0);
        tot1 = _mm512_fmadd_ps(wk, _mm512_max_ps(acc[k][1], zero), tot1);
      }
    }
    // The chunk's scale (positive, so it commutes with relu) and the 2^8 of the decoding.
    _mm512_store_ps(lg, _mm512_mul_ps(tot0, _mm512_mul_ps(_mm512_loadu_ps(scales), k256)));
    _mm512_store_ps(lg + 16,
                    _mm512_mul_ps(tot1, _mm512_mul_ps(_mm512_loadu_ps(scales + 16), k256)));
    const uint64_t c0 = b * kKeyBlock;
    std::memcpy(logits + c0, lg, sizeof(float) * std::min<uint64_t>(kKeyBlock, chunks - c0));
    std::swap(cur, nxt);
  }
}

}  // namespace

bool VbmiScoringAvailable() {
  static const bool available = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vbmi");
  return available;
}

FM_VBMI_TARGET void DecodeKeyRowsVbmi(const uint8_t* rows, uint32_t n_rows, float* out) {
  const Decoder dec;
  for (uint32_t j = 0; j < n_rows; j += 2)
    dec.RowPair(rows + size_t{j} * kKeyBlock, out + size_t{j} * kKeyBlock);
}

void ScoreBlocksVbmi(const IndexerShape& s, const float* q, const float* w, const uint8_t* blocks,
                     uint64_t b0, uint64_t b1, uint64_t chunks, float* logits) {
  if (b0 >= b1) return;
  if (s.heads <= 4) return ScanM<4>(s, q, w, blocks, b0, b1, chunks, logits);
  return ScanM<8>(s, q, w, blocks, b0, b1, chunks, logits);
}

#else  // not x86-64

bool VbmiScoringAvailable() { return false; }
void DecodeKeyRowsVbmi(const uint8_t*, uint32_t, float*) {}
void ScoreBlocksVbmi(const IndexerShape&, const float*, const float*, const uint8_t*, uint64_t,
                     uint64_t, uint64_t, float*) {}

#endif

}  // namespace fm::kernels
