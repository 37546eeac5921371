// indexer flags, shared by fm-indexer and the all-in-one binary. Include only from main.cc.
#pragma once

#include <CLI/CLI.hpp>
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

#include "common/metrics.h"
#include "services/indexer/indexer_core.h"

namespace fm::indexer {

struct IndexerFlags {
  CoreOptions core;
  std::string weights;  // loaded at start when set
  std::string default_policy = "lsa";
  // The directory LoadWeights RPCs read from (paths relative to it, or inside it); empty:
  // any path on a server without authentication, none on one with it.
  std::string weights_dir;
};

inline void AddIndexerFlags(CLI::App& app, IndexerFlags* f) {
#ifdef FM_MODELS_DIR
  // The checkpoints shipped in the source tree (models/lsa-*.safetensors), when there.
  std::vector<std::string> shipped;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(FM_MODELS_DIR, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("lsa-") && name.ends_with(".safetensors"))
      shipped.push_back(e.path().string());
  }
  std::sort(shipped.begin(), shipped.end());
  f->weights = absl::StrJoin(shipped, ",");
#endif
  app.add_option("--weights", f->weights,
                 "Indexer weights to load at start: safetensors files, comma-separated, one per "
                 "index shape (empty = none)")
      ->capture_default_str();
  app.add_option("--indexer_max_bytes", f->core.max_bytes, "Index keys and bounds of all sessions")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--lsa_best_share", f->core.lsa_best_share,
                 "lsa: share of the predicted pages chosen by their best chunk (needles) before "
                 "the rest by kept-chunk count")
      ->check(CLI::Range(0.0f, 1.0f))
      ->capture_default_str();
  app.add_option("--weights_dir", f->weights_dir,
                 "Directory the LoadWeights RPC reads weights from (required for it on a "
                 "server with --tokens_file or mTLS)");
  app.add_option("--indexer_max_sessions", f->core.max_sessions, "Sessions held")
      ->capture_default_str();
  app.add_option("--default_policy", f->default_policy,
                 "Policy for requests that name none (lsa falls back to sink_recency without "
                 "weights)")
      ->capture_default_str();
}

// Builds the core from the flags: parses the policy and loads the weights.
inline absl::StatusOr<std::unique_ptr<IndexerCore>> MakeIndexerCore(IndexerFlags f) {
  auto p = ParsePolicy(f.default_policy);
  if (!p.ok()) return p.status();
  f.core.default_policy = *p;
  auto core = std::make_unique<IndexerCore>(f.core);
  for (const std::string& path :
       std::vector<std::string>(absl::StrSplit(f.weights, ',', absl::SkipEmpty())))
    if (absl::Status st = core->LoadWeights(path); !st.ok()) return st;
  return core;
}

// Exports the core's totals on the server's /metrics.
inline void AddIndexerMetrics(const IndexerCore* core, MetricsRegistry* metrics) {
  metrics->AddCollector([core](std::string* out) {
    const CoreStats s = core->Stats();
    AppendMetricFamily(out, "fm_indexer_sessions", "Sessions held.", "gauge",
                       {{"", double(s.sessions)}});
    AppendMetricFamily(out, "fm_indexer_chunks", "Index chunks held, all sessions.", "gauge",
                       {{"", double(s.chunks)}});
    AppendMetricFamily(out, "fm_indexer_bytes", "Bytes of keys and bounds held.", "gauge",
                       {{"", double(s.bytes)}});
    AppendMetricFamily(out, "fm_indexer_predictions_total", "Predict calls answered.", "counter",
                       {{"", double(s.predictions)}});
  });
}

}  // namespace fm::indexer
