#include "common/codecs.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fm {
namespace {

// Independent reference: the value of an e4m3 code from its definition.
double Fp8Reference(int c) {
  int sign = c >> 7, exp = (c >> 3) & 0xf, man = c & 7;
  double mag = exp == 0 ? man / 8.0 * std::pow(2.0, -6) : (1 + man / 8.0) * std::pow(2.0, exp - 7);
  return sign ? -mag : mag;
}
bool IsFp8Nan(int c) { return (c & 0x7f) == 0x7f; }

TEST(Fp8E4m3, DecodesEveryCode) {
  for (int c = 0; c < 256; ++c) {
    float v = Fp8E4m3ToFloat(static_cast<uint8_t>(c));
    if (IsFp8Nan(c)) {
      EXPECT_TRUE(std::isnan(v)) << c;
    } else {
      EXPECT_EQ(static_cast<double>(v), Fp8Reference(c)) << c;
    }
  }
  EXPECT_EQ(Fp8E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8E4m3, RoundTripsEveryCode) {
  for (int c = 0; c < 256; ++c) {
    if (IsFp8Nan(c)) continue;
    uint8_t back = FloatToFp8E4m3(Fp8E4m3ToFloat(static_cast<uint8_t>(c)));
    if (c == 0x80) {
      EXPECT_EQ(back, 0x80);  // -0 keeps its sign
    } else {
      EXPECT_EQ(back, c) << c;
    }
  }
}

// Every midpoint between neighbouring codes rounds to the even code; a hair on either side
// rounds to the nearer one.
TEST(Fp8E4m3, RoundsToNearestEvenAtEveryMidpoint) {
  for (int sign = 0; sign < 2; ++sign) {
    for (int c = 0; c < 0x7e; ++c) {
      int lo = c | (sign << 7), hi = (c + 1) | (sign << 7);
      double a = Fp8Reference(lo), b = Fp8Reference(hi);
      float mid = static_cast<float>((a + b) / 2);  // exact in binary32
      ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
      int even = (c % 2 == 0) ? lo : hi;
      EXPECT_EQ(FloatToFp8E4m3(mid), even) << "between " << a << " and " << b;
      float below = std::nextafter(mid, static_cast<float>(a));
      float above = std::nextafter(mid, static_cast<float>(b));
      EXPECT_EQ(FloatToFp8E4m3(below), lo) << a << " " << b;
      EXPECT_EQ(FloatToFp8E4m3(above), hi) << a << " " << b;
    }
  }
}

TEST(Fp8E4m3, SaturatesAndKeepsNan) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToFp8E4m3(448.0f), 0x7e);
  EXPECT_EQ(FloatToFp8E4m3(449.0f), 0x7e);
  EXPECT_EQ(FloatToFp8E4m3(464.0f), 0x7e);
  EXPECT_EQ(FloatToFp8E4m3(1e30f), 0x7e);
  EXPECT_EQ(FloatToFp8E4m3(inf), 0x7e);
  EXPECT_EQ(FloatToFp8E4m3(-inf), 0xfe);
  EXPECT_EQ(FloatToFp8E4m3(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(FloatToFp8E4m3(-std::numeric_limits<float>::quiet_NaN()), 0xff);
  EXPECT_EQ(FloatToFp8E4m3(std::ldexp(1.0f, -11)), 0x00);  // a quarter of the smallest subnormal
  EXPECT_EQ(FloatToFp8E4m3(std::numeric_limits<float>::denorm_min()), 0x00);
}

TEST(Fp8E4m3, BulkMatchesScalar) {
  std::vector<float> in;
  for (int c = 0; c < 256; ++c) in.push_back(Fp8E4m3ToFloat(static_cast<uint8_t>(c)) * 1.03f);
  std::vector<uint8_t> out(in.size());
  FloatToFp8E4m3N(in.data(), out.data(), in.size());
  std::vector<float> dec(in.size());
  Fp8E4m3ToFloatN(out.data(), dec.data(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(out[i], FloatToFp8E4m3(in[i]));
    EXPECT_EQ(FloatBits(dec[i]), FloatBits(Fp8E4m3ToFloat(out[i])));
  }
}

TEST(Bf16, DecodesAndRoundTripsEveryCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    float v = Bf16ToFloat(static_cast<uint16_t>(c));
    EXPECT_EQ(FloatBits(v), c << 16);
    uint16_t back = FloatToBf16(v);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(back))) << c;
      EXPECT_EQ(back & 0x8000, c & 0x8000) << c;
    } else {
      ASSERT_EQ(back, c) << c;
    }
  }
}

TEST(Bf16, RoundsToNearestEvenAtEveryMidpoint) {
  for (uint32_t c = 0; c < 65535; ++c) {
    if ((c & 0x7f80) == 0x7f80 || ((c + 1) & 0x7f80) == 0x7f80) continue;  // inf/NaN neighbours
    if (c == 0x7fff) continue;
    uint32_t mid_bits = (c << 16) | 0x8000u;  // exactly halfway to the next code
    float mid = BitsFloat(mid_bits);
    uint16_t even = (c % 2 == 0) ? c : c + 1;
    ASSERT_EQ(FloatToBf16(mid), even) << c;
    ASSERT_EQ(FloatToBf16(BitsFloat(mid_bits - 1)), c) << c;
    ASSERT_EQ(FloatToBf16(BitsFloat(mid_bits + 1)), c + 1) << c;
  }
  // Largest finite bf16 rounds to infinity past its midpoint, as IEEE does.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
}

TEST(Fp16, RoundTripsEveryCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    float v = Fp16ToFloat(static_cast<uint16_t>(c));
    uint16_t back = FloatToFp16(v);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(Fp16ToFloat(back)));
    } else {
      ASSERT_EQ(back, c) << c;
    }
  }
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);  // midpoint past max rounds to infinity
  EXPECT_EQ(FloatToFp16(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(FloatToFp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

}  // namespace
}  // namespace fm
