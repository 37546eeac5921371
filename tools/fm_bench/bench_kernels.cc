// fm-bench kernels: sparse paged decode attention over 10 % of a 128K-token context vs dense
// attention over all of it, on the bench model spec (DESIGN §6), with the bytes each reads
// compared against a plain streaming read of the same bytes measured in the same run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "common/codecs.h"
#include "flashmemory/kernels/attention.h"
#include "flashmemory/kernels/indexer.h"
#ifdef FM_BENCH_WITH_CUDA
#include "flashmemory/kernels/cuda_attention.h"
#endif
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/thread_pool.h"
#include "tools/fm_bench/bench.h"

namespace fm::bench {
namespace {

using Clock = std::chrono::steady_clock;
using kernels::AttentionShape;
using kernels::DecodeItem;
using kernels::DecodePlan;
using kernels::ElemType;
using kernels::KernelStatus;
using kernels::PageList;
using kernels::PagePool;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `fn` `reps` times after one warm-up; returns the median in seconds.
template <typename F>
double MedianSeconds(int reps, F&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return Median(t);
}

// Times `fn` and `anchor` alternately, `reps` times each after one warm-up, so both see the
// same machine conditions on a shared, noisy host; returns the two medians in seconds.
template <typename F, typename A>
std::pair<double, double> PairedMedianSeconds(int reps, F&& fn, A&& anchor) {
  fn();
  anchor();
  std::vector<double> t, ta;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    fn();
    auto t1 = Clock::now();
    anchor();
    t.push_back(std::chrono::duration<double>(t1 - t0).count());
    ta.push_back(std::chrono::duration<double>(Clock::now() - t1).count());
  }
  return {Median(t), Median(ta)};
}

// Streams every byte of the listed cells on the kernel thread pool.
void StreamCells(const PagePool& pool, const std::vector<uint32_t>& cells, size_t page_bytes) {
  static std::vector<uint64_t> sums;
  sums.resize(cells.size());
  kernels::ThreadPool::Default().ParallelFor(static_cast<uint32_t>(cells.size()), [&](uint32_t i) {
    sums[i] = kernels::StreamReadSum(
        pool.base + size_t{cells[i]} * pool.cell_stride + pool.cell_offset, page_bytes);
  });
}

}  // namespace

int RunKernelsBench(const KernelBenchOptions& o) {
  const AttentionShape s{4, 32, 8, 128, 64, ElemType::kBf16, 0};  // the bench spec
  const uint32_t pages = static_cast<uint32_t>((o.context + s.page_tokens - 1) / s.page_tokens);
  const size_t page_bytes = s.PageBytes();
  std::fprintf(stderr, "fm-bench kernels: filling %u pages (%.2f GiB) of bench-spec KV\n", pages,
               pages * double(page_bytes) / (1 << 30));
  // The pool: one cell per page of the context, random bf16 K/V (2 threads fill it).
  const size_t pool_bytes = size_t{pages} * page_bytes;
  uint8_t* pool_mem = o.huge_pages ? kernels::AllocatePagePoolMemory(pool_bytes) : nullptr;
  std::vector<uint8_t> plain(o.huge_pages ? 0 : pool_bytes);
  uint8_t* const pool_base = o.huge_pages ? pool_mem : plain.data();
  if (pool_base == nullptr) return 1;
  kernels::ThreadPool::Default().ParallelFor(pages, [&](uint32_t c) {
    // Sum of four uniforms: roughly normal, and cheap enough to fill gigabytes quickly.
    uint64_t x = 0x9E3779B97F4A7C15ull * (c + 1);
    uint16_t* p = reinterpret_cast<uint16_t*>(pool_base + size_t{c} * page_bytes);
    for (size_t i = 0; i < page_bytes / 2; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      float v =
          ((x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48)) / 32768.0f -
          4.0f;
      p[i] = FloatToBf16(v * 0.87f);
    }
  });
  PagePool pool{pool_base, page_bytes, 0, pages};

  // Dense: every page; the last one partial. Sparse: sink + 2 tail pages + a random 10 %.
  std::vector<uint32_t> dense_cells(pages);
  std::iota(dense_cells.begin(), dense_cells.end(), 0);
  std::vector<uint16_t> dense_valid(pages, static_cast<uint16_t>(s.page_tokens));
  dense_valid.back() = static_cast<uint16_t>(o.context - uint64_t{pages - 1} * s.page_tokens);
  uint32_t keep = std::max<uint32_t>(3, static_cast<uint32_t>(pages * o.budget));
  std::vector<uint32_t> middle(dense_cells.begin() + 1, dense_cells.end() - 2);
  std::shuffle(middle.begin(), middle.end(), std::mt19937(42));
  std::vector<uint32_t> sparse_cells = {0, pages - 2, pages - 1};
  sparse_cells.insert(sparse_cells.end(), middle.begin(), middle.begin() + (keep - 3));
  std::sort(sparse_cells.begin(), sparse_cells.end());
  std::vector<uint16_t> sparse_valid;
  for (uint32_t c : sparse_cells) sparse_valid.push_back(dense_valid[c]);

  const uint32_t threads = kernels::ThreadPool::Default().size();
  auto plan_for = [&](const std::vector<uint32_t>& cells, const std::vector<uint16_t>& valid,
                      DecodePlan* plan) {
    std::string why;
    PageList list{cells.data(), valid.data(), static_cast<uint32_t>(cells.size())};
    return kernels::BuildDecodePlan(s, {list}, pool, threads, 8, plan, &why);
  };
  DecodePlan dense_plan, sparse_plan;
  if (plan_for(dense_cells, dense_valid, &dense_plan) != KernelStatus::kOk ||
      plan_for(sparse_cells, sparse_valid, &sparse_plan) != KernelStatus::kOk) {
    std::fprintf(stderr, "cannot plan\n");
    return 1;
  }
  // One decode step = every layer of the session, batched in one call.
  std::vector<float> q(size_t{s.layers} * s.q_heads * s.head_dim), out(q.size()),
      lse(size_t{s.layers} * s.q_heads);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& x : q) x = nd(rng);
  std::vector<DecodeItem> items;
  for (uint32_t l = 0; l < s.layers; ++l)
    items.push_back({0, l, q.data() + size_t{l} * s.q_heads * s.head_dim,
                     out.data() + size_t{l} * s.q_heads * s.head_dim,
                     lse.data() + size_t{l} * s.q_heads});
  auto step = [&](const DecodePlan& plan) {
    if (kernels::RunPagedDecode(plan, pool, items.data(), items.size()) != KernelStatus::kOk)
      std::abort();
  };
  std::fprintf(stderr, "fm-bench kernels: timing dense and sparse steps on %u threads (%s)\n",
               threads, kernels::CpuTargetName());
  auto [dense_s, dense_stream_s] = PairedMedianSeconds(
      o.reps, [&] { step(dense_plan); }, [&] { StreamCells(pool, dense_cells, page_bytes); });
  auto [sparse_s, sparse_stream_s] = PairedMedianSeconds(
      o.reps * 5, [&] { step(sparse_plan); }, [&] { StreamCells(pool, sparse_cells, page_bytes); });
  const double dense_bytes = double(dense_cells.size()) * page_bytes,
               sparse_bytes = double(sparse_cells.size()) * page_bytes;
  const double stream_gbps = dense_bytes / dense_stream_s / 1e9;
  const double dense_gbps = dense_bytes / dense_s / 1e9,
               sparse_gbps = sparse_bytes / sparse_s / 1e9;
  const double sparse_stream_gbps = sparse_bytes / sparse_stream_s / 1e9;

  std::printf(
      "\nfm-bench kernels: bench spec (L=%u Hq=%u Hkv=%u d=%u bf16), %llu-token context, %u "
      "threads, %s\n",
      s.layers, s.q_heads, s.kv_heads, s.head_dim, static_cast<unsigned long long>(o.context),
      threads, kernels::CpuTargetName());
  // Arithmetic: per layer and query head, one multiply-add per K and per V element attended.
  const double peak_gflops = kernels::MeasureFmaPeakGflops(0.5);
  auto gflops = [&](size_t pages_attended, double secs) {
    return 4.0 * s.layers * s.q_heads * s.head_dim * double(pages_attended) * s.page_tokens / secs /
           1e9;
  };
  const double dense_gflops = gflops(dense_cells.size(), dense_s);
  const double sparse_gflops = gflops(sparse_cells.size(), sparse_s);
  // Each step's bandwidth is compared with a streaming read of the same cells, timed
  // alternately with it.
  const double sparse_frac = sparse_gbps / sparse_stream_gbps,
               dense_frac = dense_gbps / stream_gbps;
  std::printf("%-40s %10s %10s %s\n", "decode attention (one step, all layers)", "ms/step", "GB/s",
              "of a streaming read of the same bytes");
  std::printf("%-40s %10.2f %10.2f %.0f%% (stream %.1f GB/s)\n", "dense: every page", dense_s * 1e3,
              dense_gbps, 100 * dense_frac, stream_gbps);
  std::printf("%-40s %10.2f %10.2f %.0f%% (stream %.1f GB/s)\n",
              ("sparse: " + std::to_string(sparse_cells.size()) + " pages (" +
               std::to_string(int(o.budget * 100)) + " %)")
                  .c_str(),
              sparse_s * 1e3, sparse_gbps, 100 * sparse_frac, sparse_stream_gbps);
  std::printf("%-40s %10.1f GFLOP/s; dense at %.0f%%, sparse at %.0f%% of it\n",
              "anchor: fp32 FMA peak, all threads", peak_gflops, 100 * dense_gflops / peak_gflops,
              100 * sparse_gflops / peak_gflops);
  std::printf(
      "sparse speedup %.1fx (target >= 8x) [%s]; sparse %.0f%% and dense %.0f%% of stream read "
      "(target >= 70%%) [%s]\n",
      dense_s / sparse_s, dense_s / sparse_s >= 8 ? "met" : "MISSED", 100 * sparse_frac,
      100 * dense_frac, (sparse_frac >= 0.7 && dense_frac >= 0.7) ? "met" : "MISSED");
  // Indexer scoring of a 1M-token history (bench spec: 3 index layers x 16 heads x 128).
  kernels::FreePagePoolMemory(pool_mem, pool_bytes);
  plain.clear();
  plain.shrink_to_fit();
  kernels::IndexerShape is{3, 16, 128};
  const uint64_t chunks = o.index_tokens / 4;
  std::fprintf(stderr, "fm-bench kernels: indexer scoring over %llu chunks x %u layers\n",
               static_cast<unsigned long long>(chunks), is.layers);
  std::vector<std::vector<uint8_t>> keys(is.layers, std::vector<uint8_t>(chunks * is.KeyBytes()));
  for (auto& k : keys) {
    std::vector<float> raw(is.dim);
    uint64_t x = 88172645463325252ull;
    for (uint64_t c = 0; c < chunks; ++c) {
      for (float& v : raw) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        v = static_cast<float>(static_cast<int64_t>(x % 2001) - 1000) / 300.0f;
      }
      kernels::CompressIndexKey(is.dim, raw.data(), k.data() + c * is.KeyBytes());
    }
  }
  std::vector<float> iq(size_t{is.layers} * is.heads * is.dim), iw(size_t{is.layers} * is.heads);
  for (float& x : iq) x = nd(rng);
  for (float& x : iw) x = nd(rng) * 0.1f;
  std::vector<float> logits(size_t{is.layers} * chunks);
  kernels::SelectParams sp;
  sp.total_pages = (chunks + 15) / 16;
  sp.kmax = static_cast<uint32_t>(sp.total_pages / 10);
  std::vector<kernels::ScoredPageOut> picked;
  double select_s = MedianSeconds(o.reps, [&] {
    if (kernels::SelectPages(is.layers, logits.data(), chunks, sp, &picked) != KernelStatus::kOk)
      std::abort();
  });
  const double key_bytes = double(is.layers) * chunks * is.KeyBytes();
  // The indexer holds keys in the scan layout (blocks of 32 chunks, dimension-major): the
  // same bytes, read once per prediction.
  std::vector<kernels::HugePageBytes> blocks;  // as the indexer holds them
  std::vector<const uint8_t*> block_ptrs;
  for (auto& k : keys) {
    blocks.emplace_back(kernels::KeyBlocksBytes(is.dim, chunks), 0);
    kernels::PackIndexKeys(is.dim, k.data(), 0, chunks, blocks.back().data());
    block_ptrs.push_back(blocks.back().data());
  }
  std::vector<uint64_t> sums(is.layers * 16);
  auto stream_keys = [&] {
    kernels::ThreadPool::Default().ParallelFor(is.layers * 16, [&](uint32_t t) {
      const uint64_t part = blocks[t / 16].size() / 16;
      sums[t] = kernels::StreamReadSum(blocks[t / 16].data() + (t % 16) * part, part);
    });
  };
  const double block_bytes = double(is.layers) * blocks[0].size();
  struct IndexRun {
    std::string name;
    double s, stream_s;
  };
  std::vector<IndexRun> runs;
  auto time_blocks = [&](kernels::ScoreMath math, const char* what) {
    // A scan takes tens of milliseconds: as many pairs as the sparse step, for a steadier
    // median on a shared machine.
    auto [t, st] = PairedMedianSeconds(
        o.reps * 5,
        [&] {
          if (kernels::ScoreKeyBlocks(is, iq.data(), iw.data(), block_ptrs.data(), chunks, math,
                                      logits.data()) != KernelStatus::kOk)
            std::abort();
        },
        stream_keys);
    runs.push_back({std::string(what) + " (" + kernels::ScoreKeyBlocksPath(math) + ")", t,
                    st * key_bytes / block_bytes});
  };
  time_blocks(kernels::ScoreMath::kFast, "scan layout, fast");
  time_blocks(kernels::ScoreMath::kExact, "scan layout, exact fp32");
  std::printf("%-40s %10s %10s\n",
              ("indexer: " + std::to_string(chunks) + " chunks x 3 layers").c_str(), "ms",
              "GB/s of a streaming read of the same bytes");
  for (const IndexRun& r : runs) {
    const double gbps = key_bytes / r.s / 1e9, stream = key_bytes / r.stream_s / 1e9;
    std::printf("  %-38s %10.2f %10.2f %.0f%% (stream %.1f GB/s), %.1f GFLOP/s\n", r.name.c_str(),
                r.s * 1e3, gbps, 100 * gbps / stream, stream,
                2.0 * is.heads * is.dim * chunks * is.layers / r.s / 1e9);
  }
  const double score_s = runs[0].s, key_stream_gbps = key_bytes / runs[0].stream_s / 1e9;
  const double index_gbps = key_bytes / score_s / 1e9;
  const double chunks_per_s = double(chunks) * is.layers / score_s;
  const double index_gflops = 2.0 * is.heads * is.dim * chunks_per_s / 1e9;
  std::printf("%-40s %10.2f\n", "indexer: page selection (top 10 %)", select_s * 1e3);
  // The scan does 2 * Hi * di flops per key of di + 4 bytes (31 per byte at the bench spec):
  // at the FMA peak of its arithmetic it could read at most this much.
  // The fast scan's arithmetic: fp16 FMAs and int16 dot-product pairs (vpdpwssd) do twice
  // the multiply-adds of an fp32 FMA per instruction, at the same issue rate.
  const std::string fast_path = kernels::ScoreKeyBlocksPath(kernels::ScoreMath::kFast);
  const char* arith = fast_path == "avx512fp16"   ? "fp16"
                      : fast_path == "avx512vnni" ? "int16"
                                                  : "fp32";
  const double arith_peak = peak_gflops * (std::string(arith) == "fp32" ? 1 : 2);
  const double bound_gbps = arith_peak * 1e9 / (2.0 * is.heads * is.dim) * is.KeyBytes() / 1e9;
  std::printf(
      "indexer: %.0f GFLOP/s = %.0f%% of the %s multiply-add peak (%.0f GFLOP/s); at that peak "
      "the scan would read %.1f GB/s = %.0f%% of stream\n",
      index_gflops, 100 * index_gflops / arith_peak, arith, arith_peak, bound_gbps,
      100 * bound_gbps / key_stream_gbps);
  std::printf("indexer: %.3g chunk-layers/s; %.0f%% of stream read (target >= 60%%) [%s]\n",
              chunks_per_s, 100 * index_gbps / key_stream_gbps,
              index_gbps >= 0.6 * key_stream_gbps ? "met" : "MISSED");
  std::vector<std::pair<std::string, double>> figures = {
      {"fma_peak_gflops", peak_gflops},
      {"dense_fma_fraction", dense_gflops / peak_gflops},
      {"sparse_fma_fraction", sparse_gflops / peak_gflops},
      {"index_fma_fraction", index_gflops / arith_peak},
      {"index_chunks_per_s", chunks_per_s},
      {"index_bw_fraction", index_gbps / key_stream_gbps},
      {"index_score_ms", score_s * 1e3},
      {"index_exact_score_ms", runs[1].s * 1e3},
      {"index_select_ms", select_s * 1e3},
      {"sparse_step_ms", sparse_s * 1e3},
      {"dense_step_ms", dense_s * 1e3},
      {"sparse_speedup", dense_s / sparse_s},
      {"sparse_bw_fraction", sparse_frac},
      {"dense_bw_fraction", dense_frac},
      {"stream_read_gbps", stream_gbps}};
#ifdef FM_BENCH_WITH_CUDA
  // With a GPU present, the same step on the device against its HBM bandwidth.
  std::string why;
  if (kernels::CudaAvailable(&why)) {
    std::printf("\n");
    if (RunGpuKernelsBench(GpuBenchOptions{}, &figures) != 0) return 1;
  } else {
    std::fprintf(stderr, "fm-bench kernels: no GPU (%s); CPU figures only\n", why.c_str());
  }
#endif
  if (!o.json.empty() && !WriteJsonObject(o.json, figures)) return 1;
  return 0;
}

}  // namespace fm::bench
