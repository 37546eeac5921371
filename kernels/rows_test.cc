#include "flashmemory/kernels/rows.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace fm::kernels {
namespace {

// Every length from 0 to 70 (whole vectors, blocks of four, tails), a row stride wider than
// the length, against the scalar sum in double.
TEST(CombineRows, EqualsTheScalarSumAtEveryLength) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const uint32_t rows = 9;
  const size_t stride = 80;
  std::vector<float> m(rows * stride), a(rows), out(stride, 123.0f);
  for (float& x : m) x = nd(rng);
  for (float& x : a) x = nd(rng);
  for (uint32_t n = 0; n <= 70; ++n) {
    std::fill(out.begin(), out.end(), 123.0f);
    const float mx = CombineRows(m.data(), stride, a.data(), rows, 0.25f, n, out.data());
    double want_max = -std::numeric_limits<double>::infinity();
    for (uint32_t t = 0; t < n; ++t) {
      double want = 0.25;
      for (uint32_t r = 0; r < rows; ++r) want += double(a[r]) * m[r * stride + t];
      EXPECT_NEAR(out[t], want, 1e-4) << "n " << n << " t " << t;
      want_max = std::max(want_max, double(out[t]));
    }
    EXPECT_EQ(out[n], 123.0f) << "wrote past n = " << n;
    if (n == 0)
      EXPECT_EQ(mx, -std::numeric_limits<float>::infinity());
    else
      EXPECT_EQ(mx, static_cast<float>(want_max)) << "n " << n;
  }
}

}  // namespace
}  // namespace fm::kernels
