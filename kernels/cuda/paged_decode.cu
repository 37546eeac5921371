// CUDA paged decode attention: the host side (plans on the device, launch lists, scratch)
// of the kernels in paged_decode_kernel.cuh, and the streaming-read anchor kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

#include "flashmemory/kernels/cuda_attention.h"
#include "kernels/cuda/paged_decode_kernel.cuh"

namespace fm::kernels {
namespace {

using namespace cuda_decode;

// Grows a scratch buffer to hold `bytes`; null on allocation failure.
void* Reserve(void*& ptr, size_t& cap, size_t bytes) {
  if (bytes <= cap) return ptr;
  cudaFree(ptr);
  ptr = nullptr;
  cap = 0;
  if (cudaMalloc(&ptr, bytes) != cudaSuccess) return nullptr;
  cap = bytes;
  return ptr;
}

template <typename V>
V* Stage(void*& ptr, size_t& cap, const std::vector<V>& host, cudaStream_t stream) {
  if (host.empty()) return nullptr;
  V* dev = static_cast<V*>(Reserve(ptr, cap, sizeof(V) * host.size()));
  if (dev)
    cudaMemcpyAsync(dev, host.data(), sizeof(V) * host.size(), cudaMemcpyHostToDevice, stream);
  return dev;
}

template <typename V>
V* ToDevice(const std::vector<V>& host) {
  V* dev = nullptr;
  if (host.empty() || cudaMalloc(&dev, sizeof(V) * host.size()) != cudaSuccess) return nullptr;
  cudaMemcpy(dev, host.data(), sizeof(V) * host.size(), cudaMemcpyHostToDevice);
  return dev;
}

}  // namespace

bool CudaAvailable(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    return false;
  }
  return true;
}

KernelStatus CudaDecodePlan::Upload(const DecodePlan& plan, std::unique_ptr<CudaDecodePlan>* out,
                                    std::string* why) {
  const AttentionShape& s = plan.shape;
  if (SharedFloats(s.head_dim, s.page_tokens) * sizeof(float) > kMaxSharedBytes) {
    if (why) *why = "CUDA kernel: head_dim + page_tokens exceed 48 KiB of shared memory";
    return KernelStatus::kInvalidShape;
  }
  if (VectorsPerLane(Geometry(s)) > 2) {
    if (why) *why = "CUDA kernel: a K/V row over 1 KiB";
    return KernelStatus::kInvalidShape;
  }
  std::unique_ptr<CudaDecodePlan> p(new CudaDecodePlan());
  p->host_ = plan;
  std::vector<uint32_t> cells, first;
  std::vector<uint16_t> valid;
  ConcatPageLists(plan, &cells, &valid, &first);
  p->cells_ = ToDevice(cells);
  p->valid_ = ToDevice(valid);
  p->seq_first_ = ToDevice(first);
  p->units_ = ToDevice(plan.units);
  if (!p->cells_ || !p->valid_ || !p->seq_first_ || !p->units_) {
    if (why) *why = "CUDA: cannot allocate the plan on the device";
    return KernelStatus::kInvalidShape;
  }
  *out = std::move(p);
  return KernelStatus::kOk;
}

CudaDecodePlan::~CudaDecodePlan() {
  cudaFree(cells_);
  cudaFree(valid_);
  cudaFree(seq_first_);
  cudaFree(units_);
  for (Scratch* sc : {&items_, &tasks_, &merges_, &partial_out_, &partial_lse_}) cudaFree(sc->ptr);
}

KernelStatus CudaRunPagedDecode(const CudaDecodePlan& plan, const PagePool& pool,
                                const DecodeItem* items, size_t n_items, void* stream_ptr) {
  const DecodePlan& hp = plan.host_;
  const AttentionShape& s = hp.shape;
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // 16-byte loads need 16-byte aligned rows (head_dim is a multiple of 16 elements).
  if ((reinterpret_cast<uintptr_t>(pool.base) + pool.cell_offset) % 16 != 0 ||
      pool.cell_stride % 16 != 0)
    return KernelStatus::kInvalidShape;
  LaunchLists lists;
  if (KernelStatus st = BuildLaunchLists(hp, items, n_items, &lists); st != KernelStatus::kOk)
    return st;
  const std::vector<uint2>& tasks = lists.tasks;
  const std::vector<uint4>& merges = lists.merges;
  if (tasks.empty()) return KernelStatus::kOk;
  DevItem* d_items = Stage(plan.items_.ptr, plan.items_.bytes, lists.items, stream);
  uint2* d_tasks = Stage(plan.tasks_.ptr, plan.tasks_.bytes, tasks, stream);
  uint4* d_merges = Stage(plan.merges_.ptr, plan.merges_.bytes, merges, stream);
  float *p_out = nullptr, *p_lse = nullptr;
  if (hp.num_partials > 0) {
    p_out = static_cast<float*>(Reserve(plan.partial_out_.ptr, plan.partial_out_.bytes,
                                        sizeof(float) * n_items * hp.num_partials * G * d));
    p_lse = static_cast<float*>(Reserve(plan.partial_lse_.ptr, plan.partial_lse_.bytes,
                                        sizeof(float) * n_items * hp.num_partials * G));
    if (!p_out || !p_lse) return KernelStatus::kInvalidShape;
  }
  if (!d_items || !d_tasks || (!merges.empty() && !d_merges)) return KernelStatus::kInvalidShape;
  KShape ks{s.layers, s.q_heads, s.kv_heads, s.head_dim, s.page_tokens, s.Scale()};
  const RowGeometry g = Geometry(s);
  const size_t shmem = SharedFloats(d, s.page_tokens) * sizeof(float);
  const dim3 grid(static_cast<uint32_t>(tasks.size()), HeadBlocks(s));
  DispatchDecode(s, [&](auto elem, auto nv) {
    PagedDecodeKernel<decltype(elem), decltype(nv)::value><<<grid, kThreads, shmem, stream>>>(
        ks, g, pool.base, pool.cell_stride, pool.cell_offset, plan.cells_, plan.valid_,
        plan.seq_first_, static_cast<const DecodePlan::Unit*>(plan.units_), d_items, d_tasks, p_out,
        p_lse, hp.num_partials);
  });
  if (!merges.empty())
    MergeKernel<<<merges.size(), kThreads, 0, stream>>>(G, d, d_items, d_merges, p_out, p_lse,
                                                        hp.num_partials);
  return cudaGetLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kInvalidShape;
}

}  // namespace fm::kernels

namespace fm::kernels {
namespace {

__global__ void StreamReadKernel(const uint4* __restrict__ p, size_t n, unsigned long long* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(p + i);  // streaming: do not keep in L2
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) atomicAdd(sink, 1ull);  // keeps the loads alive
}

}  // namespace

double CudaStreamReadSeconds(const void* p, size_t bytes, int reps) {
  unsigned long long* sink = nullptr;
  cudaMalloc(&sink, sizeof(*sink));
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const size_t n = bytes / sizeof(uint4);
  StreamReadKernel<<<sms * 8, 512>>>(static_cast<const uint4*>(p), n, sink);  // warm-up
  float best = 1e30f;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(a);
    StreamReadKernel<<<sms * 8, 512>>>(static_cast<const uint4*>(p), n, sink);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    best = std::min(best, ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(sink);
  return best / 1e3;
}

}  // namespace fm::kernels
