// CPU-only helpers used by benchmarks and tests.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fm::kernels {

// Reads every byte of [p, p + bytes) with the widest SIMD loads the CPU has and returns
// their 64-bit word sum: the streaming-read anchor for bandwidth fractions.
uint64_t StreamReadSum(const uint8_t* p, size_t bytes);

}  // namespace fm::kernels
