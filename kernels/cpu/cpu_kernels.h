// CPU-only helpers used by benchmarks and tests.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "flashmemory/kernels/indexer.h"

namespace fm::kernels {

// For the fast index scans, which scale each head of q by a power of two: the binary
// exponent e of the largest |x| of n values (max = f 2^e, f in [0.5, 1); 0 when all are 0).
// False when one of them is not finite.
bool MaxAbsExponent(const float* x, size_t n, int* e);

// q as the fast scans broadcast it: qp[g][j / 2][k] holds bits(h, j) in its low and
// bits(h, j + 1) in its high 16 bits, h = min(g * tile + k, heads - 1) (heads past the
// last repeat it; their weight is 0).
template <typename Bits>
std::vector<uint32_t> PackQueryPairs(const IndexerShape& s, uint32_t tile, Bits bits) {
  const uint32_t di = s.dim, H = s.heads, groups = (H + tile - 1) / tile;
  std::vector<uint32_t> qp(size_t{groups} * (di / 2) * tile);
  for (uint32_t g = 0; g < groups; ++g)
    for (uint32_t j = 0; j < di; j += 2)
      for (uint32_t k = 0; k < tile; ++k) {
        const uint32_t h = std::min(g * tile + k, H - 1);
        qp[(size_t{g} * (di / 2) + j / 2) * tile + k] =
            uint32_t{uint16_t(bits(h, j))} | uint32_t{uint16_t(bits(h, j + 1))} << 16;
      }
  return qp;
}

// Scratch for a scan's decoded block and the next one, each `bytes` long and 64-byte
// aligned. The second starts 1,344 bytes past the first's end: blocks a multiple of 4 KiB
// apart make each decode store alias (in its low 12 address bits) the scan's loads, which
// then wait on it (measured on the int16 scan: ~800 -> 670-690 ns per block).
class DecodeBuffers {
 public:
  explicit DecodeBuffers(size_t bytes) : mem_(2 * bytes + 64 + kAliasPad), bytes_(bytes) {}
  uint8_t* first() {
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(mem_.data()) + 63) &
                                      ~uintptr_t{63});
  }
  uint8_t* second() { return first() + bytes_ + kAliasPad; }

 private:
  static constexpr size_t kAliasPad = 1344;
  std::vector<uint8_t> mem_;
  size_t bytes_;
};

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
