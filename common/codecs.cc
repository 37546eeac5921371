#include "common/codecs.h"

#include <cmath>

namespace fm {
namespace {

// Decoded value of every fp8 e4m3 code, built once.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int c = 0; c < 256; ++c) {
      int sign = c >> 7, exp = (c >> 3) & 0xf, man = c & 0x7;
      float mag;
      if (exp == 0xf && man == 0x7) {
        mag = std::numeric_limits<float>::quiet_NaN();
      } else if (exp == 0) {
        mag = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
      } else {
        mag = std::ldexp(1.0f + man / 8.0f, exp - 7);
      }
      v[c] = sign ? -mag : mag;
    }
  }
};
const Fp8Table& Table() {
  static const Fp8Table t;
  return t;
}

}  // namespace

float Fp8E4m3ToFloat(uint8_t v) { return Table().v[v]; }

uint8_t FloatToFp8E4m3(float f) {
  uint32_t u = FloatBits(f);
  uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;   // NaN
  if (a >= 0x43e00000u) return sign | 0x7e;  // >= 448 (incl. inf): saturate to 448
  // Work in units of the smallest subnormal (2^-9) for values below 2^-6, else per-binade.
  int e = static_cast<int>(a >> 23) - 127;  // unbiased exponent of |f|
  if (e < -6) {
    // Subnormal range (and below): value / 2^-9 rounded to nearest even, 0..8.
    float scaled = BitsFloat(a) * 512.0f;   // exact (power of two)
    float r = std::nearbyint(scaled);       // default rounding mode: nearest even
    return sign | static_cast<uint8_t>(r);  // r == 8 encodes 2^-6 (exp=1, man=0)
  }
  // Normal: keep 3 mantissa bits, round to nearest even on the 20 dropped bits.
  uint32_t man = a & 0x7fffffu;
  uint32_t keep = man >> 20, rest = man & 0xfffffu;
  uint32_t half = 0x80000u;
  if (rest > half || (rest == half && (keep & 1))) ++keep;
  uint32_t exp = static_cast<uint32_t>(e + 7);
  if (keep == 8) {
    keep = 0;
    ++exp;
  }
  uint32_t code = (exp << 3) | keep;
  if (code > 0x7e) code = 0x7e;  // 464..448 boundary: saturate
  return sign | static_cast<uint8_t>(code);
}

float Fp16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
  if (exp == 0) {
    float m = std::ldexp(static_cast<float>(man), -24);
    return sign ? -m : m;
  }
  return BitsFloat(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t FloatToFp16(float f) {
  uint32_t u = FloatBits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00 | static_cast<uint16_t>((a >> 13) & 0x3ff);
  if (a >= 0x477ff000u) return sign | 0x7c00;  // rounds to >= 65520: infinity
  int e = static_cast<int>(a >> 23) - 127;
  if (e < -14) {
    float r = std::nearbyint(BitsFloat(a) * 16777216.0f);  // units of 2^-24
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t man = a & 0x7fffffu;
  uint32_t keep = man >> 13, rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (keep & 1))) ++keep;
  uint32_t exp = static_cast<uint32_t>(e + 15);
  if (keep == 0x400) {
    keep = 0;
    ++exp;
  }
  return sign | static_cast<uint16_t>((exp << 10) | keep);
}

void Fp8E4m3ToFloatN(const uint8_t* in, float* out, size_t n) {
  const float* t = Table().v;
  for (size_t i = 0; i < n; ++i) out[i] = t[in[i]];
}

void FloatToFp8E4m3N(const float* in, uint8_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = FloatToFp8E4m3(in[i]);
}

}  // namespace fm
