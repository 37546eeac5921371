// CPU-only helpers used by benchmarks and tests.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fm::kernels {

// Reads every byte of [p, p + bytes) with the widest SIMD loads the CPU has and returns
// their 64-bit word sum: the streaming-read anchor for bandwidth fractions.
uint64_t StreamReadSum(const uint8_t* p, size_t bytes);

// Best fp32 GFLOP/s of independent fused multiply-adds on every pool thread over about
// `seconds`: the compute-peak anchor for the kernels' utilisation.
double MeasureFmaPeakGflops(double seconds);

// Memory for a pool of page cells: anonymous, 2 MiB aligned and advised to use transparent
// huge pages, so the attention kernels' scattered page reads do not miss the TLB on every
// 4 KiB. Zero-filled. Free with FreePagePoolMemory.
uint8_t* AllocatePagePoolMemory(size_t bytes);
void FreePagePoolMemory(uint8_t* p, size_t bytes);

}  // namespace fm::kernels
