// fm-bench: the FlashMemory benchmark suite, one subcommand per part.
#include <CLI/CLI.hpp>

#include "tools/fm_bench/bench.h"

int main(int argc, char** argv) {
  CLI::App app{"FlashMemory benchmarks: figures and same-run anchors"};
  app.require_subcommand(1);
  fm::bench::KvBenchOptions kv;
  auto* kvc = app.add_subcommand("kvstore",
                                 "Page get over UCX, gRPC and RocksDB spill vs memcpy and RocksDB");
  kvc->add_option("--pages", kv.pages, "Pages per path")->capture_default_str();
  kvc->add_option("--page_bytes", kv.page_bytes, "Payload bytes per page")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  kvc->add_option("--rounds", kv.rounds, "Timed passes (best reported)")->capture_default_str();
  kvc->add_option("--batch", kv.batch, "Pages per call")->capture_default_str();
  kvc->add_option("--json", kv.json, "Write figures as JSON");
  fm::bench::KernelBenchOptions kb;
  auto* kc =
      app.add_subcommand("kernels", "Sparse vs dense paged decode attention vs a streaming read");
  kc->add_option("--context", kb.context, "Tokens in the session")->capture_default_str();
  kc->add_option("--budget", kb.budget, "Fraction of pages the sparse step attends to")
      ->capture_default_str();
  kc->add_option("--reps", kb.reps, "Timed dense steps")->capture_default_str();
  kc->add_option("--json", kb.json, "Write figures as JSON");
  kc->add_flag("!--no_huge_pages", kb.huge_pages, "Back the page pool with 4 KiB pages only");
  fm::bench::IndexerBenchOptions ib;
  auto* ic = app.add_subcommand(
      "indexer", "Mass recall, label recall/precision, needle hits and Predict latency per policy");
  ic->add_option("--weights", ib.weights,
                 "Indexer weights (safetensors; default: the shipped models/lsa-SPEC)");
  ic->add_option("--spec", ib.spec, "Model spec preset")->capture_default_str();
  ic->add_option("--best_share", ib.best_share,
                 "lsa: share of the pages chosen by best chunk score")
      ->capture_default_str();
  ic->add_option("--contexts", ib.contexts, "Context lengths in tokens")->capture_default_str();
  ic->add_option("--sessions", ib.sessions, "Held-out sessions per context")->capture_default_str();
  ic->add_option("--steps", ib.steps, "Decode steps per session")->capture_default_str();
  ic->add_option("--steps_1m", ib.steps_1m, "Decode steps at 1M tokens")->capture_default_str();
  ic->add_option("--budget", ib.budget, "Resident fraction of the pages")->capture_default_str();
  ic->add_option("--seed", ib.seed, "First held-out session seed")->capture_default_str();
  ic->add_option("--tau", ib.tau, "Decode steps per cycle (one Predict each)")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  ic->add_option("--json", ib.json, "Write the rows as JSON");
  ic->add_flag("--verbose", ib.verbose, "Per-cycle mass recall of every policy on stderr");
  fm::bench::FloodBenchOptions fb;
  auto* fc = app.add_subcommand(
      "flood", "Another session's step latency while streams flood the worker with requests");
  fc->add_option("--seconds", fb.seconds, "Length of each phase")->capture_default_str();
  fc->add_option("--interval_ms", fb.interval_ms, "The victim's step period")
      ->capture_default_str();
  fc->add_option("--floods", fb.floods, "Flooding streams")->capture_default_str();
  fc->add_option("--batch", fb.batch, "Requests per flood batch")->capture_default_str();
  fc->add_option("--max_batch_requests", fb.max_batch_requests, "The server's batch bound")
      ->capture_default_str();
  fc->add_option("--refused_bytes_per_s", fb.refused_bytes_per_s,
                 "The server's refusal throttle (0 = off; default: the server's)");
  fc->add_option("--json", fb.json, "Write the figures as JSON");
  fm::bench::ChaosBenchOptions cb;
  auto* cc = app.add_subcommand(
      "chaos", "A six-process mTLS cluster under kills and restarts: outputs, pages, crashes");
  cc->add_option("--sessions", cb.sessions, "Concurrent sessions")->capture_default_str();
  cc->add_option("--minutes", cb.minutes, "How long faults are injected")->capture_default_str();
  cc->add_option("--fault_every_s", cb.fault_every_s, "Mean gap between faults")
      ->capture_default_str();
  cc->add_option("--steps", cb.steps, "Decode steps per session (a multiple of 16)")
      ->check(CLI::Range(16u, 1u << 20))
      ->capture_default_str();
  cc->add_option("--prefill", cb.prefill_tokens, "Prefill tokens per session")
      ->capture_default_str();
  cc->add_option("--step_interval_ms", cb.step_interval_ms, "A session's step period at most")
      ->capture_default_str();
  cc->add_option("--flood_seconds", cb.flood_seconds, "Each phase of the closing flood figure")
      ->capture_default_str();
  cc->add_option("--seed", cb.seed, "Workload seed")->capture_default_str();
  cc->add_option("--certs", cb.certs, "A make_dev_certs.sh directory (default: made per run)");
  cc->add_flag("--keep", cb.keep, "Keep the run's directory (service logs, databases)");
  cc->add_option("--json", cb.json, "Write the figures as JSON");
  fm::bench::E2eBenchOptions eb;
  auto* ec = app.add_subcommand(
      "e2e", "The cluster end to end: dense vs sparse fidelity, footprint, throughput, ceiling");
  ec->add_option("--target", eb.target, "A running decode worker (default: start flashmemory)");
  ec->add_option("--tls_ca", eb.security.tls.ca, "--target: CA that verifies the server (TLS)");
  ec->add_option("--tls_cert", eb.security.tls.cert, "--target: client certificate (mTLS)");
  ec->add_option("--tls_key", eb.security.tls.key, "--target: client key (mTLS)");
  ec->add_option("--token", eb.security.token, "--target: the tenant's bearer token");
  ec->add_option("--contexts", eb.contexts, "Context lengths (bench spec below 512K, long above)")
      ->capture_default_str();
  ec->add_option("--steps", eb.steps, "Decode steps of the fidelity run")->capture_default_str();
  ec->add_option("--conc_steps", eb.conc_steps, "Steps per streaming style, concurrent runs")
      ->capture_default_str();
  ec->add_option("--sessions", eb.sessions, "Concurrent sessions")->capture_default_str();
  ec->add_option("--ram_cap", eb.ram_cap, "KV bytes the concurrent sessions of a mode may hold")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  ec->add_option("--budget", eb.budget,
                 "Sparse footprint cap (the most of a session's pages it holds), bench spec, "
                 "at 128K; other contexts x (context / 128K)^-1/3")
      ->capture_default_str();
  ec->add_option("--long_budget", eb.long_budget,
                 "The same for the long spec (512K and up), at 1M")
      ->capture_default_str();
  ec->add_flag("--flat_budget", eb.flat_budget, "The same cap at every context of a spec");
  ec->add_option("--tau", eb.tau, "Decode steps per cycle, bench spec")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  ec->add_option("--long_tau", eb.long_tau, "The same for the long spec")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  ec->add_flag("--miss_check", eb.miss_check,
              "Start the server with the per-step miss check (miss recovery) on");
  ec->add_option("--miss_ratio", eb.miss_ratio,
                 "Sparse sessions' own synchronous miss check: a page whose Quest bound exceeds "
                 "the resident attention's log-sum-exp by log(ratio) is read before the layer "
                 "answers (0 = off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  ec->add_option("--server_flag", eb.server_flags,
                 "A flag for the started server, as --name=value (repeatable), e.g. "
                 "--server_flag=--fetch_headroom=0")
      ->allow_extra_args(false);
  ec->add_option("--policy", eb.policy,
                 "Sparse policy (default: the worker's, lsa where weights fit the spec)")
      ->capture_default_str();
  ec->add_option("--fidelity_sessions", eb.fidelity_sessions,
                 "Sessions per context whose fidelity is averaged")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ec->add_option("--seed", eb.seed, "Session seed: a context of n x 32K tokens uses seed + n - 1")
      ->capture_default_str();
  ec->add_option("--server_ram", eb.server_ram, "kvstore RAM tier of the started server")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  ec->add_option("--server_reserve", eb.server_reserve,
                 "Device reserve of the started server (also the ceiling's budget)")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  ec->add_option("--json", eb.json, "Write the rows as JSON");
  ec->add_option("--plots", eb.plots, "Directory for PNG plots (with --json)");
  CLI11_PARSE(app, argc, argv);
  if (fc->parsed()) return fm::bench::RunFloodBench(fb);
  if (cc->parsed()) return fm::bench::RunChaosBench(cb);
  if (ec->parsed()) return fm::bench::RunE2eBench(eb);
  if (ic->parsed()) {
    if (ib.weights.empty()) ib.weights = std::string(FM_MODELS_DIR) + "/lsa-" + ib.spec + ".safetensors";
    return fm::bench::RunIndexerBench(ib);
  }
  if (kvc->parsed()) return fm::bench::RunKvStoreBench(kv);
  if (kc->parsed()) return fm::bench::RunKernelsBench(kb);
  return 2;
}
