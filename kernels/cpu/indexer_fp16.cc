// The blocked index scan in AVX512-FP16 (ScoreMath::kFast): 32 chunks per zmm register in
// fp16, twice the lanes of fp32 at the same FMA rate. The chunk scan is compute bound in
// fp32 (2 * Hi * di flops per 132-byte key: 31 flops per byte at the bench spec), so the
// narrower arithmetic is what brings it to the memory's speed.
//
// Exactness: fp8-e4m3 decodes exactly into fp16 (times 2^-8, folded into the scale); q is
// rounded to fp16 after a per-head power-of-two scaling (so |q| < 2, done by the caller);
// products are summed in fp16 over kSpan dimensions (kSpan / 2 per lane, then the lane
// pair) and in fp32 across spans and heads.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/avx512_intrinsics.h"
#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {

#if defined(FM_HAVE_AVX512FP16)
namespace {

constexpr uint32_t kSpan = 128;  // dimensions summed in fp16 before widening to fp32

#define FM_FP16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512fp16")))

// A block is first decoded into L1 as fp16 vectors of 16 chunks x 2 adjacent dimensions
// (lane 2c + t: chunk c, dimension j + t), so that q enters as one 32-bit broadcast of the
// pair (q[j], q[j + 1]): a plain load, where a 16-bit broadcast costs a shuffle uop per FMA.
// Then a register tile of 8 heads x 32 chunks (16 accumulators) takes 10 loads per 16
// FMAs, under the two 512-bit loads per cycle that the FMAs would otherwise wait on. Lanes
// 2c and 2c + 1 are added when the dot products are complete.
constexpr uint32_t kHeadTile = 8;

// From the 64 bytes of rows j and j + 1, byte (t * 32 + half * 16 + c) goes to the high
// byte of 16-bit lane 2c + t (low byte zeroed): the fp8 code shifted left by 8. An
// arithmetic shift right by one and clearing bit 14 then give the fp16 pattern
// s.0eeee.mmm0000000, the fp8 value times 2^-8. kv gets [di / 2][half] vectors.
// (Separate functions keep each phase's constants out of the FMA loop's registers.)
FM_FP16_TARGET __attribute__((noinline)) void DecodeBlock(const uint8_t* base, uint32_t di,
                                                          __m512h* kv) {
  alignas(64) static const uint8_t kIdx[2][64] = {
#define FM_IDX(h, l) 0, static_cast<uint8_t>(((l) % 2) * 32 + (h)*16 + (l) / 2)
#define FM_IDX8(h, l)                                                                   \
  FM_IDX(h, l), FM_IDX(h, l + 1), FM_IDX(h, l + 2), FM_IDX(h, l + 3), FM_IDX(h, l + 4), \
      FM_IDX(h, l + 5), FM_IDX(h, l + 6), FM_IDX(h, l + 7)
      {FM_IDX8(0, 0), FM_IDX8(0, 8), FM_IDX8(0, 16), FM_IDX8(0, 24)},
      {FM_IDX8(1, 0), FM_IDX8(1, 8), FM_IDX8(1, 16), FM_IDX8(1, 24)}};
#undef FM_IDX8
#undef FM_IDX
  const __m512i idx0 = _mm512_load_si512(kIdx[0]), idx1 = _mm512_load_si512(kIdx[1]);
  const __mmask64 high_bytes = 0xAAAAAAAAAAAAAAAAull;
  const __m512i clear14 = _mm512_set1_epi16(static_cast<short>(0xBFFF));
  for (uint32_t j = 0; j < di; j += 2) {
    const __m512i rows = _mm512_loadu_si512(base + size_t{j} * kKeyBlock);
    const __m512i y0 = _mm512_maskz_permutexvar_epi8(high_bytes, idx0, rows);
    const __m512i y1 = _mm512_maskz_permutexvar_epi8(high_bytes, idx1, rows);
    kv[j] = _mm512_castsi512_ph(_mm512_and_si512(_mm512_srai_epi16(y0, 1), clear14));
    kv[j + 1] = _mm512_castsi512_ph(_mm512_and_si512(_mm512_srai_epi16(y1, 1), clear14));
  }
}

// Dot products of kHeadTile heads (q pairs at qj, kHeadTile per dimension pair) with the 32
// chunks of kv over dimensions [j0, j1), added to (or, for the first span, stored in)
// part[head][half][chunk]. Each dimension pair prefetches the line at `prefetch` +
// pf_step * (j - j0) / 2 into L1.
FM_FP16_TARGET __attribute__((noinline)) void SpanTile(const __m512h* kv, const uint32_t* qj,
                                                       uint32_t j0, uint32_t j1, bool first,
                                                       const uint8_t* prefetch, uint32_t pf_step,
                                                       float (*part)[2][16]) {
  __m512h a0 = _mm512_setzero_ph(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
          c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, c6 = a0, c7 = a0;
  for (uint32_t j = j0; j < j1; j += 2, qj += kHeadTile) {
    _mm_prefetch(reinterpret_cast<const char*>(prefetch) + pf_step * ((j - j0) / 2),
                 _MM_HINT_T0);
    const __m512h k0 = kv[j], k1 = kv[j + 1];
#define FM_FMA(k)                                                                       \
  {                                                                                     \
    const __m512h qk = _mm512_castsi512_ph(_mm512_set1_epi32(static_cast<int>(qj[k]))); \
    a##k = _mm512_fmadd_ph(qk, k0, a##k);                                               \
    c##k = _mm512_fmadd_ph(qk, k1, c##k);                                               \
  }
    FM_FMA(0) FM_FMA(1) FM_FMA(2) FM_FMA(3) FM_FMA(4) FM_FMA(5) FM_FMA(6) FM_FMA(7)
#undef FM_FMA
  }
  const __m512h acc[kHeadTile][2] = {{a0, c0}, {a1, c1}, {a2, c2}, {a3, c3},
                                     {a4, c4}, {a5, c5}, {a6, c6}, {a7, c7}};
  for (uint32_t k = 0; k < kHeadTile; ++k)
    for (int half = 0; half < 2; ++half) {
      // Lane 2c + 1 onto lane 2c (one more fp16 rounding), the even lanes narrowed to 16
      // fp16 values and widened to fp32: the span's dot products of 16 chunks.
      const __m512h a = acc[k][half];
      const __m512h sum =
          _mm512_add_ph(a, _mm512_castsi512_ph(_mm512_srli_epi32(_mm512_castph_si512(a), 16)));
      __m512 dot =
          _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_cvtepi32_epi16(_mm512_castph_si512(sum))));
      if (!first) dot = _mm512_add_ps(dot, _mm512_load_ps(part[k][half]));
      _mm512_store_ps(part[k][half], dot);
    }
}

}  // namespace

FM_FP16_TARGET void ScoreBlocksFp16(const IndexerShape& s, const uint32_t* qp, const float* w,
                                    const uint8_t* blocks, uint64_t b0, uint64_t b1,
                                    uint64_t chunks, float* logits) {
  const uint32_t di = s.dim, H = s.heads, groups = (H + kHeadTile - 1) / kHeadTile;
  const uint32_t span = std::min(kSpan, di);
  const __m512 zero = _mm512_setzero_ps();
  std::vector<uint8_t> kv_mem(size_t{di} * 64 + 64);
  __m512h* kv = reinterpret_cast<__m512h*>((reinterpret_cast<uintptr_t>(kv_mem.data()) + 63) &
                                           ~uintptr_t{63});
  alignas(64) float part[kHeadTile][2][16];  // [head][half][chunk] fp32 sums over spans
  alignas(64) float lg[kKeyBlock];
  const uint32_t pf_step = std::max(1u, 64 / groups);  // bytes of the next block per pair
  for (uint64_t b = b0; b < b1; ++b) {
    const uint8_t* base = blocks + b * KeyBlockBytes(di);
    const float* scales = reinterpret_cast<const float*>(base + size_t{di} * kKeyBlock);
    DecodeBlock(base, di, kv);
    // The scan of this block walks the next block's rows (di * 32 bytes) into L1, spread
    // evenly over all its head groups: the whole block's compute hides one block of memory
    // latency without the burst of misses that fills the line-fill buffers (measured: 9 %
    // faster than walking them all in the first group; 30 % faster than no software
    // prefetch, as the hardware streamer restarts at every 4 KiB).
    const uint8_t* next = b + 1 < b1 ? base + KeyBlockBytes(di) : base;
    __m512 tot0 = zero, tot1 = zero;
    for (uint32_t g = 0; g < groups; ++g) {
      for (uint32_t s0 = 0; s0 < di; s0 += span)
        SpanTile(kv, qp + (size_t{g} * (di / 2) + s0 / 2) * kHeadTile, s0, s0 + span, s0 == 0,
                 next + (size_t{g} * di + s0) * 32 / groups, pf_step, part);
      for (uint32_t k = 0; k < kHeadTile; ++k) {
        const uint32_t h = g * kHeadTile + k;
        const __m512 wk = _mm512_set1_ps(h < H ? w[h] : 0.0f);
        tot0 = _mm512_fmadd_ps(wk, _mm512_max_ps(_mm512_load_ps(part[k][0]), zero), tot0);
        tot1 = _mm512_fmadd_ps(wk, _mm512_max_ps(_mm512_load_ps(part[k][1]), zero), tot1);
      }
    }
    // The chunk's scale (positive, so it commutes with relu) and the 2^8 of the decoding.
    const __m512 k256 = _mm512_set1_ps(256.0f);
    _mm512_store_ps(lg, _mm512_mul_ps(tot0, _mm512_mul_ps(_mm512_loadu_ps(scales), k256)));
    _mm512_store_ps(lg + 16,
                    _mm512_mul_ps(tot1, _mm512_mul_ps(_mm512_loadu_ps(scales + 16), k256)));
    const uint64_t c0 = b * kKeyBlock;
    std::memcpy(logits + c0, lg, sizeof(float) * std::min<uint64_t>(kKeyBlock, chunks - c0));
  }
}

namespace {

bool CpuHasAvx512Fp16() {
  // AVX512-FP16 is CPUID leaf 7 EDX bit 23; __builtin_cpu_supports("avx512f") also checks
  // that the OS saves the zmm state.
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vbmi"))
    return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  __cpuid_count(7, 0, a, b, c, d);
  return (d >> 23) & 1;
}

}  // namespace

bool Fp16ScoringAvailable() {
  static const bool available = CpuHasAvx512Fp16();
  return available;
}

std::vector<uint32_t> Fp16QueryPairs(const IndexerShape& s, const float* q) {
  return PackQueryPairs(s, kHeadTile, [&](uint32_t h, uint32_t j) {
    const _Float16 v = static_cast<_Float16>(q[size_t{h} * s.dim + j]);
    uint16_t bits;
    std::memcpy(&bits, &v, 2);
    return bits;
  });
}

#else  // the compiler cannot build AVX512-FP16 code

bool Fp16ScoringAvailable() { return false; }
std::vector<uint32_t> Fp16QueryPairs(const IndexerShape&, const float*) { return {}; }
void ScoreBlocksFp16(const IndexerShape&, const uint32_t*, const float*, const uint8_t*, uint64_t,
                     uint64_t, uint64_t, float*) {}

#endif

}  // namespace fm::kernels
