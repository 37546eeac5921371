// CPU-only helpers used by benchmarks and tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
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

// The fp32 blocked index scan on AVX-512 CPUs with VBMI (indexer_vbmi.cc): byte-table
// decoding of the fp8 keys, interleaved with the scan of the block before. Available when
// the CPU has AVX512-VBMI. DecodeKeyRowsVbmi: n_rows (even) rows of 32 keys, as a key block
// holds them, to fp32 times 2^-8, exactly (the NaN code reads as 480, as through fp16),
// into 64-byte aligned `out`. ScoreBlocksVbmi scores blocks [b0, b1) of one layer.
bool VbmiScoringAvailable();
void DecodeKeyRowsVbmi(const uint8_t* rows, uint32_t n_rows, float* out);
void ScoreBlocksVbmi(const IndexerShape& s, const float* q, const float* w, const uint8_t* blocks,
                     uint64_t b0, uint64_t b1, uint64_t chunks, float* logits);

// The fast blocked index scan in int16 on AVX-512 CPUs with VNNI and VBMI
// (indexer_vnni.cc; ScoreMath::kFast where AVX512-FP16 is missing). IntQuery packs one
// layer's q as int16 pairs and folds the scaling into the head weights (false if q or w is
// not finite: then use the fp32 scan); ScoreBlocksInt scores blocks [b0, b1) of that layer.
bool VnniScoringAvailable();
bool IntQuery(const IndexerShape& s, const float* q, const float* w, std::vector<uint32_t>* qp,
              std::vector<float>* wq);
void ScoreBlocksInt(const IndexerShape& s, const uint32_t* qp, const float* wq,
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

// An allocator for large scanned arrays (the indexer's key blocks): allocations of 2 MiB
// or more come from AllocatePagePoolMemory, smaller ones from operator new. A 1M-token
// history's keys span 8,448 4 KiB pages per index layer, one per 32-chunk block, far more
// than the TLB holds; on 2 MiB pages a scan touches 17 (measured on 2 cores,
// alternating: the fast scan of 1M tokens 9-17 % faster, a streaming read of the same keys
// 1.2-1.35x).
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHugeBytes = size_t{2} << 20;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n * sizeof(T) < kHugeBytes) return static_cast<T*>(::operator new(n * sizeof(T)));
    uint8_t* p = AllocatePagePoolMemory(n * sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    return reinterpret_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) < kHugeBytes)
      ::operator delete(p);
    else
      FreePagePoolMemory(reinterpret_cast<uint8_t*>(p), n * sizeof(T));
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const {
    return true;
  }
};
using HugePageBytes = std::vector<uint8_t, HugePageAllocator<uint8_t>>;

}  // namespace fm::kernels
