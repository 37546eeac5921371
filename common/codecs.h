// Bit-exact scalar codecs for the storage types.
//
// bf16: the top 16 bits of an IEEE binary32; encode rounds to nearest even; NaN stays NaN
// (quiet, sign kept); infinities and overflow to infinity behave as in IEEE.
//
// fp8 e4m3 (OCP "E4M3FN"): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities;
// S.1111.111 is NaN; largest finite 448; subnormals down to 2^-9. Encode rounds to nearest
// even and saturates: any finite value or infinity beyond ±448 becomes ±448; NaN -> 0x7F
// (0xFF for negative NaN).
//
// fp16: IEEE binary16, round to nearest even, overflow to infinity, NaN quiet.
#pragma once

#include <cstdint>
#include <cstring>

namespace fm {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float Bf16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }
inline uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float Fp8E4m3ToFloat(uint8_t v);
uint8_t FloatToFp8E4m3(float f);
float Fp16ToFloat(uint16_t h);
uint16_t FloatToFp16(float f);

// Bulk conversions (n elements).
void Fp8E4m3ToFloatN(const uint8_t* in, float* out, size_t n);
void FloatToFp8E4m3N(const float* in, uint8_t* out, size_t n);

}  // namespace fm
