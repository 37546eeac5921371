// CPU CombineRows (flashmemory/kernels/rows.h) with Highway runtime dispatch.
// Highway's per-target include sequence must stay in this order.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/rows_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <hwy/highway.h>

#include <algorithm>
#include <limits>

#include "flashmemory/kernels/rows.h"

// clang-format on
HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

float Combine(const float* rows, size_t stride, const float* a, uint32_t n_rows, float base,
              uint32_t n, float* out) {
  const DF df;
  const size_t N = hn::Lanes(df);
  auto vmax = hn::Set(df, -std::numeric_limits<float>::infinity());
  size_t t = 0;
  // Four vectors of tokens at a time, held in registers over all the rows.
  for (; t + 4 * N <= n; t += 4 * N) {
    auto a0 = hn::Set(df, base), a1 = a0, a2 = a0, a3 = a0;
    for (uint32_t r = 0; r < n_rows; ++r) {
      const auto c = hn::Set(df, a[r]);
      const float* row = rows + r * stride + t;
      a0 = hn::MulAdd(c, hn::LoadU(df, row), a0);
      a1 = hn::MulAdd(c, hn::LoadU(df, row + N), a1);
      a2 = hn::MulAdd(c, hn::LoadU(df, row + 2 * N), a2);
      a3 = hn::MulAdd(c, hn::LoadU(df, row + 3 * N), a3);
    }
    hn::StoreU(a0, df, out + t);
    hn::StoreU(a1, df, out + t + N);
    hn::StoreU(a2, df, out + t + 2 * N);
    hn::StoreU(a3, df, out + t + 3 * N);
    vmax = hn::Max(vmax, hn::Max(hn::Max(a0, a1), hn::Max(a2, a3)));
  }
  for (; t + N <= n; t += N) {
    auto acc = hn::Set(df, base);
    for (uint32_t r = 0; r < n_rows; ++r)
      acc = hn::MulAdd(hn::Set(df, a[r]), hn::LoadU(df, rows + r * stride + t), acc);
    hn::StoreU(acc, df, out + t);
    vmax = hn::Max(vmax, acc);
  }
  float mx = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; t < n; ++t) {
    float acc = base;
    for (uint32_t r = 0; r < n_rows; ++r) acc += a[r] * rows[r * stride + t];
    out[t] = acc;
    mx = std::max(mx, acc);
  }
  return mx;
}

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fm::kernels {

HWY_EXPORT(Combine);

float CombineRows(const float* rows, size_t stride, const float* a, uint32_t n_rows, float base,
                  uint32_t n, float* out) {
  return HWY_DYNAMIC_DISPATCH(Combine)(rows, stride, a, n_rows, base, n, out);
}

}  // namespace fm::kernels
#endif  // HWY_ONCE
