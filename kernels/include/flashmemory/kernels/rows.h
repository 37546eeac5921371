// A linear combination of rows, the inner loop of scoring many keys at once when the keys
// are laid out one dimension per row (as the decode worker's miss check keeps them).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fm::kernels {

// out[t] = base + sum over r < n_rows of a[r] * rows[r * stride + t], for t < n; returns the
// largest out[t] (-inf when n is 0). SIMD with runtime dispatch; `out` must not overlap
// `rows`.
float CombineRows(const float* rows, size_t stride, const float* a, uint32_t n_rows, float base,
                  uint32_t n, float* out);

}  // namespace fm::kernels
