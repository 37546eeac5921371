// CPU-only helpers used by benchmarks and tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "flashmemory/kernels/indexer.h"

namespace fm::kernels {

// The AVX512-FP16 blocked index scan (indexer_fp16.cc; ScoreMath::kFast): available when
// the compiler built it and the CPU has AVX512-FP16. Fp16QueryPairs packs one layer's q
// (scaled so that every |q| < 2; ScoreKeyBlocks does it) as the scan reads it;
// ScoreBlocksFp16 scores blocks [b0, b1) of that layer.
bool Fp16ScoringAvailable();
std::vector<uint32_t> Fp16QueryPairs(const IndexerShape& s, const float* q);
void ScoreBlocksFp16(const IndexerShape& s, const uint32_t* qp, const float* w,
                     const uint8_t* blocks, uint64_t b0, uint64_t b1, uint64_t chunks,
                     float* logits);

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
