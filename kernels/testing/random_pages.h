// Test-only: page payloads of random K/V values in any element type.
#pragma once

#include <cstring>
#include <random>
#include <vector>

#include "common/codecs.h"
#include "flashmemory/kernels/attention.h"

namespace fm::kernels::testing {

// Writes n elements of type t at p, drawing each value from nd(rng).
inline void FillRandomElems(ElemType t, uint8_t* p, size_t n, std::mt19937& rng,
                            std::normal_distribution<float>& nd) {
  for (size_t i = 0; i < n; ++i) {
    const float v = nd(rng);
    if (t == ElemType::kF32) {
      std::memcpy(p + 4 * i, &v, 4);
    } else {
      const uint16_t h = t == ElemType::kBf16 ? FloatToBf16(v) : FloatToFp16(v);
      std::memcpy(p + 2 * i, &h, 2);
    }
  }
}

// `pages` contiguous page payloads of standard-normal K/V.
inline std::vector<uint8_t> RandomPages(const AttentionShape& s, uint32_t pages, uint64_t seed) {
  std::vector<uint8_t> b(size_t{pages} * s.PageBytes());
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  FillRandomElems(s.dtype, b.data(), b.size() / ElemSize(s.dtype), rng, nd);
  return b;
}

}  // namespace fm::kernels::testing
