// Scalar element access for the reference kernels: element i of a K/V buffer as float.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/codecs.h"
#include "flashmemory/kernels/attention.h"

namespace fm::kernels::reference {

inline float LoadElem(ElemType t, const uint8_t* p, size_t i) {
  uint16_t h;
  float f;
  switch (t) {
    case ElemType::kF32:
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    case ElemType::kF16:
      std::memcpy(&h, p + 2 * i, 2);
      return Fp16ToFloat(h);
    case ElemType::kBf16:
      std::memcpy(&h, p + 2 * i, 2);
      return Bf16ToFloat(h);
  }
  return 0;
}

}  // namespace fm::kernels::reference
