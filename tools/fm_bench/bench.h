// fm-bench subcommands. Each prints a table of figures measured in one run, with anchors
// measured in the same run, and optionally writes them as JSON.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/security.h"

namespace fm::bench {

struct KvBenchOptions {
  int pages = 256;                   // pages stored and read per path
  uint64_t page_bytes = 1ull << 20;  // payload bytes per page
  int rounds = 3;                    // timed passes over the pages (best is reported)
  int batch = 32;                    // pages per UCX Resolve / gRPC GetPages call
  std::string json;                  // write figures here when set
};

int RunKvStoreBench(const KvBenchOptions& options);

struct KernelBenchOptions {
  uint64_t context = 131072;  // tokens in the session
  double budget = 0.10;       // fraction of pages the sparse step attends to
  int reps = 5;               // timed dense steps (sparse: 5x as many); the median is reported
  uint64_t index_tokens = 1 << 20;  // history scored by the indexer benchmark
  bool huge_pages = true;           // back the page pool with transparent huge pages
  std::string json;
};

int RunKernelsBench(const KernelBenchOptions& options);

struct E2eBenchOptions {
  std::string target;  // a running decode worker / all-in-one; empty = start flashmemory
  ClientSecurity security;  // for --target: TLS files and the tenant's token
  std::vector<uint64_t> contexts = {32768, 131072, 524288, 1048576};  // bench spec < 512K
  uint32_t steps = 256;                    // decode steps of the fidelity run
  uint32_t conc_steps = 64;                // steps per streaming style in the concurrency runs
  std::vector<int> sessions = {1, 4, 16};  // concurrent sessions (capped per context)
  uint64_t ram_cap = 8ull << 30;           // KV bytes the concurrency runs may hold per mode
  // Sparse footprint caps: the bench spec's (contexts below 512K) at 128K and the long
  // spec's (512K and up) at 1M; other contexts scale them by ContextBudget unless flat.
  double budget = 0.10;
  double long_budget = 0.05;
  bool flat_budget = false;
  uint32_t tau = 8;           // decode steps per cycle, bench spec: its switch lag is 2
  uint32_t long_tau = 32;     // the same, long spec: its switch lag is 8
  std::string policy = "default";  // sparse policy (the worker default: lsa where weights fit)
  bool miss_check = false;         // start the server with the per-step miss check
  double miss_ratio = 0;           // sparse sessions' own synchronous miss check (0 = off)
  std::vector<std::string> server_flags;  // more flags for the started server, as given
  uint64_t seed = 777001;
  int fidelity_sessions = 3;  // sessions per context in the fidelity figures (the first also
                              // runs the concurrency figures)
  uint64_t server_ram = 8ull << 30;      // kvstore RAM tier of the started server
  uint64_t server_reserve = 9ull << 30;  // device reserve of the started server
  std::string json;
  std::string plots;  // directory for PNG plots (needs /usr/bin/python3 with matplotlib)
};

int RunE2eBench(const E2eBenchOptions& options);

struct FloodBenchOptions {
  double seconds = 10;                // each phase's length
  double interval_ms = 2;             // the victim's step period
  uint32_t floods = 2;                // flooding streams
  uint32_t batch = 4096;              // requests per flood batch
  uint32_t max_batch_requests = 4096; // the server's bound
  double refused_bytes_per_s = -1;    // the server's refusal throttle; < 0: its default
  std::string json;
};
int RunFloodBench(const FloodBenchOptions& options);
struct ChaosBenchOptions {
  uint32_t sessions = 4;          // concurrent sessions (one thread each)
  double minutes = 5;             // how long faults are injected
  double fault_every_s = 8;       // mean gap between faults (uniform in [0.5, 1.5] of it)
  uint32_t steps = 2048;          // decode steps per session (whole cycles of 16): longer
                                  // than a worker's drain, so SIGTERMs move sessions too
  uint64_t prefill_tokens = 2048; // history before the first step
  double step_interval_ms = 2;    // a session's step period at most
  double flood_seconds = 5;       // each phase of the flood figure at the end
  uint64_t seed = 7100;
  std::string certs;              // a make_dev_certs.sh directory (default: made in the run)
  bool keep = false;              // keep the run's directory (logs, databases)
  std::string json;
};
// 0: every target met; 3: wrong outputs, lost pages or crashes; 1: could not run.
int RunChaosBench(const ChaosBenchOptions& options);

// The flood measurement against a running decode worker (TLS and token in security): a
// victim session `victim` of the tiny spec, alone and then flooded; the session is deleted.
struct FloodFigures {
  uint32_t steps_per_phase = 0;
  double p50_alone = 0, p99_alone = 0, p50_flood = 0, p99_flood = 0, ratio = 0;
  uint64_t batches = 0, refused = 0;  // flood batches answered, refused whole
};
absl::StatusOr<FloodFigures> MeasureFlood(const std::string& target,
                                          const ClientSecurity& security,
                                          const FloodBenchOptions& options,
                                          const std::string& victim);
void PrintFlood(const FloodBenchOptions& options, const FloodFigures& figures);

// The footprint cap of a context from the cap at an anchor context: the caps (10 %
// at 128K, 5 % at 1M) keep pages growing as context^(2/3) between them, and this continues
// that law to other contexts: cap * (context / anchor)^(-1/3), at most 1 (32K at 15.9 %,
// 512K at 6.3 %).
double ContextBudget(double cap, uint64_t anchor, uint64_t context);

// Shared helpers (bench_util.cc).
double Percentile(std::vector<double> v, double p);  // p in [0, 1], nearest rank
bool WriteJsonRows(const std::string& path, const std::vector<std::string>& rows);

struct IndexerBenchOptions {
  std::string spec = "bench";
  std::string weights;  // indexer weights (safetensors)
  std::vector<uint64_t> contexts = {32768, 131072, 1048576};
  int sessions = 8;         // held-out sessions per context (1 at 1M tokens)
  uint32_t steps = 512;     // decode steps per session (whole cycles)
  uint32_t steps_1m = 256;  // at 1M tokens
  uint32_t tau = 8;
  double budget = 0.10;    // resident pages / context pages, sink and tail included
  float best_share = 0.125f;  // lsa: share of the pages chosen by best chunk (CoreOptions)
  uint64_t seed = 900001;  // held out: training uses other seeds
  bool verbose = false;    // per-cycle mass of every policy on stderr
  std::string json;
};

int RunIndexerBench(const IndexerBenchOptions& options);

struct GpuBenchOptions {
  uint64_t context = 131072;  // tokens in the session
  double budget = 0.10;       // fraction of pages the sparse step attends to
  int reps = 20;              // timed steps; the median is reported
  double hbm_gbps = 4800;     // nominal HBM bandwidth (H200: 4.8 TB/s)
};

// Runs the CUDA benchmark and appends its figures (gpu_*); 2 = no GPU, 3 = wrong outputs.
int RunGpuKernelsBench(const GpuBenchOptions& options,
                       std::vector<std::pair<std::string, double>>* figures);

// Writes {"key": value, ...} to path; returns false on I/O error.
bool WriteJsonObject(const std::string& path,
                     const std::vector<std::pair<std::string, double>>& kv);

}  // namespace fm::bench
