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
  CLI11_PARSE(app, argc, argv);
  if (kvc->parsed()) return fm::bench::RunKvStoreBench(kv);
  if (kc->parsed()) return fm::bench::RunKernelsBench(kb);
  return 2;
}
