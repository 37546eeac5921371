// Device helpers shared by the CUDA kernels, and the macros that let their device code
// compile for a GPU (nvcc) or for the CPU behind kernels/testing/simt_emulator.h.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#define FM_SHARED_FLOATS(name) extern __shared__ float name[]
#define FM_KERNEL __global__
#define FM_UNROLL _Pragma("unroll")
#else  // the SIMT emulator provides the CUDA names
#define FM_SHARED_FLOATS(name) float* name = reinterpret_cast<float*>(::fm::simt::SharedMemory())
#define FM_KERNEL inline
#define FM_UNROLL
#endif

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

// Calls f(T()) with the storage type of K/V elements of type t.
template <typename F>
void DispatchElemType(ElemType t, F&& f) {
  switch (t) {
    case ElemType::kF32:
      return f(float());
    case ElemType::kF16:
      return f(__half());
    case ElemType::kBf16:
      return f(__nv_bfloat16());
  }
}

// An element of K or V as float, whatever its storage type.
__device__ __forceinline__ float ToF(float x) { return x; }
__device__ __forceinline__ float ToF(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace fm::kernels
