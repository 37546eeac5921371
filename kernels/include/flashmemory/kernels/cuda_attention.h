// CUDA paged decode attention (built when nvcc is present; sm_90 for H100/H200). Same
// contract as RunPagedDecode: a DecodePlan built on the host once per cycle is uploaded
// once (CudaDecodePlan) and run for every layer of every step. q/out/lse of the items and
// the page pool live in device memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

// True when this build has the CUDA backend and a device is visible.
bool CudaAvailable(std::string* why);

class CudaDecodePlan {
 public:
  // Copies the plan's page lists and work units to the device. kInvalidShape when the
  // shape exceeds the CUDA kernel's limits (48 KiB of shared memory: 64 * (head_dim +
  // page_tokens + 2) bytes; see why).
  static KernelStatus Upload(const DecodePlan& plan, std::unique_ptr<CudaDecodePlan>* out,
                             std::string* why);
  ~CudaDecodePlan();
  const DecodePlan& host() const { return host_; }

 private:
  friend KernelStatus CudaRunPagedDecode(const CudaDecodePlan&, const PagePool&, const DecodeItem*,
                                         size_t, void*);
  CudaDecodePlan() = default;
  DecodePlan host_;
  uint32_t* cells_ = nullptr;  // all sequences' cells, concatenated
  uint16_t* valid_ = nullptr;
  uint32_t* seq_first_ = nullptr;  // per sequence: index of its first page in cells_
  void* units_ = nullptr;          // device copy of host_.units
  // Per-run scratch (task lists, partial states), grown on demand and reused; runs on one
  // plan are serialised by the caller's stream.
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  mutable Scratch items_, tasks_, merges_, partial_out_, partial_lse_;
};

// items[i].q/out/lse are device pointers; pool.base is device memory, with every cell's
// payload 16-byte aligned (base + cell_offset and cell_stride multiples of 16; else
// kInvalidShape). `stream` is a cudaStream_t (null = default stream). Returns once the work
// is queued on the stream; calls on the same plan must share that stream.
KernelStatus CudaRunPagedDecode(const CudaDecodePlan& plan, const PagePool& pool,
                                const DecodeItem* items, size_t n_items, void* stream);

// Best time of `reps` passes of a read-only streaming kernel over [p, p + bytes) on the
// device: the bandwidth anchor for the CUDA benchmark.
double CudaStreamReadSeconds(const void* p, size_t bytes, int reps);

}  // namespace fm::kernels
