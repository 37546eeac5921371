// The CUDA half of `fm-bench kernels` (also the standalone fm-gpu-bench, which runs on a GPU
// machine that has none of the service dependencies): sparse (10 %) vs dense paged decode
// attention at 128K tokens on the bench spec, GB/s against a streaming-read kernel measured
// in the same run and against the device's nominal HBM bandwidth, and the timed outputs
// checked against the scalar reference.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/codecs.h"
#include "flashmemory/kernels/cuda_attention.h"
#include "tools/fm_bench/bench.h"

namespace fm::bench {

using namespace fm::kernels;

int RunGpuKernelsBench(const GpuBenchOptions& o,
                       std::vector<std::pair<std::string, double>>* figures) {
  const uint64_t context = o.context;
  const double budget = o.budget, hbm_gbps = o.hbm_gbps;
  const int reps = o.reps;
  std::string why;
  if (!CudaAvailable(&why)) {
    std::fprintf(stderr, "gpu bench: no GPU (%s)\n", why.c_str());
    return 2;
  }
  const AttentionShape s{4, 32, 8, 128, 64, ElemType::kBf16, 0};
  const uint32_t pages = static_cast<uint32_t>((context + 63) / 64);
  const size_t page_bytes = s.PageBytes(), bytes = size_t{pages} * page_bytes;
  uint8_t* pool = nullptr;
  if (cudaMalloc(&pool, bytes) != cudaSuccess) return 1;
  // Random bf16 K/V, made on the host (the sparse result is checked against the reference).
  std::vector<uint16_t> host(bytes / 2);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (auto& h : host) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const float v = (static_cast<float>(x % 4001) - 2000.0f) / 1000.0f;
    h = FloatToBf16(v);
  }
  cudaMemcpy(pool, host.data(), bytes, cudaMemcpyHostToDevice);
  PagePool dpool{pool, page_bytes, 0, pages};
  std::vector<uint32_t> dense(pages);
  std::iota(dense.begin(), dense.end(), 0u);
  std::vector<uint16_t> dvalid(pages, 64);
  std::vector<uint32_t> middle(dense.begin() + 1, dense.end() - 2);
  std::shuffle(middle.begin(), middle.end(), std::mt19937(42));
  const uint32_t keep = std::max<uint32_t>(3, static_cast<uint32_t>(pages * budget));
  std::vector<uint32_t> sparse = {0, pages - 2, pages - 1};
  sparse.insert(sparse.end(), middle.begin(), middle.begin() + (keep - 3));
  std::sort(sparse.begin(), sparse.end());
  std::vector<uint16_t> svalid(sparse.size(), 64);
  float *q, *out, *lse;
  cudaMalloc(&q, sizeof(float) * s.layers * s.q_heads * s.head_dim);
  cudaMalloc(&out, sizeof(float) * s.layers * s.q_heads * s.head_dim);
  cudaMalloc(&lse, sizeof(float) * s.layers * s.q_heads);
  std::vector<float> hq(size_t{s.layers} * s.q_heads * s.head_dim);
  for (size_t i = 0; i < hq.size(); ++i) hq[i] = std::sin(0.37f * i);
  cudaMemcpy(q, hq.data(), sizeof(float) * hq.size(), cudaMemcpyHostToDevice);
  std::vector<DecodeItem> items;
  for (uint32_t l = 0; l < s.layers; ++l)
    items.push_back({0, l, q + size_t{l} * s.q_heads * s.head_dim,
                     out + size_t{l} * s.q_heads * s.head_dim, lse + size_t{l} * s.q_heads});
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  auto time_plan = [&](const std::vector<uint32_t>& cells, const std::vector<uint16_t>& valid) {
    DecodePlan plan;
    PageList list{cells.data(), valid.data(), static_cast<uint32_t>(cells.size())};
    if (BuildDecodePlan(s, {list}, dpool, static_cast<uint32_t>(sms) * 2, 4, &plan, &why) !=
        KernelStatus::kOk)
      std::exit(1);
    std::unique_ptr<CudaDecodePlan> gp;
    if (CudaDecodePlan::Upload(plan, &gp, &why) != KernelStatus::kOk) std::exit(1);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    CudaRunPagedDecode(*gp, dpool, items.data(), items.size(), nullptr);
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      cudaEventRecord(a);
      CudaRunPagedDecode(*gp, dpool, items.data(), items.size(), nullptr);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float t = 0;
      cudaEventElapsedTime(&t, a, b);
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2] / 1e3;
  };
  const double dense_s = time_plan(dense, dvalid), sparse_s = time_plan(sparse, svalid);
  const double stream_s = CudaStreamReadSeconds(pool, bytes, 10);
  // Correctness of what was timed: the sparse step's outputs against the scalar reference.
  double worst = 0;
  {
    time_plan(sparse, svalid);  // leaves the sparse step's outputs in `out`
    cudaDeviceSynchronize();
    std::vector<float> got(hq.size());
    cudaMemcpy(got.data(), out, sizeof(float) * got.size(), cudaMemcpyDeviceToHost);
    PagePool hpool{reinterpret_cast<const uint8_t*>(host.data()), page_bytes, 0, pages};
    PageList list{sparse.data(), svalid.data(), static_cast<uint32_t>(sparse.size())};
    std::vector<float> want(size_t{s.q_heads} * s.head_dim), lse(s.q_heads);
    for (uint32_t l = 0; l < s.layers; ++l) {
      reference::PagedDecode(s, hpool, list, l, hq.data() + size_t{l} * want.size(), want.data(),
                             lse.data());
      for (size_t i = 0; i < want.size(); ++i)
        worst = std::max(worst, double(std::abs(got[size_t{l} * want.size() + i] - want[i])));
    }
  }
  const double stream_gbps = bytes / stream_s / 1e9;
  const double dense_gbps = bytes / dense_s / 1e9,
               sparse_gbps = double(sparse.size()) * page_bytes / sparse_s / 1e9;
  std::printf("fm-gpu-bench: bench spec, %llu tokens, %u SMs\n",
              static_cast<unsigned long long>(context), sms);
  std::printf("%-34s %10s %10s %12s %12s\n", "decode attention", "ms/step", "GB/s", "of stream",
              "of HBM");
  std::printf("%-34s %10.3f %10.0f %11.0f%% %11.0f%%\n", "dense", dense_s * 1e3, dense_gbps,
              100 * dense_gbps / stream_gbps, 100 * dense_gbps / hbm_gbps);
  std::printf("%-34s %10.3f %10.0f %11.0f%% %11.0f%%\n", "sparse (10 %)", sparse_s * 1e3,
              sparse_gbps, 100 * sparse_gbps / stream_gbps, 100 * sparse_gbps / hbm_gbps);
  std::printf("%-34s %10.3f %10.0f\n", "anchor: streaming read", stream_s * 1e3, stream_gbps);
  std::printf("sparse speedup %.1fx; dense %.0f%% of HBM (target >= 80%%)\n", dense_s / sparse_s,
              100 * dense_gbps / hbm_gbps);
  cudaFree(pool);
  cudaFree(q);
  cudaFree(out);
  cudaFree(lse);
  figures->insert(figures->end(), {{"gpu_dense_step_ms", dense_s * 1e3},
                                   {"gpu_sparse_step_ms", sparse_s * 1e3},
                                   {"gpu_sparse_speedup", dense_s / sparse_s},
                                   {"gpu_dense_gbps", dense_gbps},
                                   {"gpu_sparse_gbps", sparse_gbps},
                                   {"gpu_stream_read_gbps", stream_gbps},
                                   {"gpu_dense_hbm_fraction", dense_gbps / hbm_gbps},
                                   {"gpu_max_abs_error", worst}});
  return worst < 1e-3 ? 0 : 3;
}

}  // namespace fm::bench
