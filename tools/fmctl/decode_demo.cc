// fmctl demo: a generated long session decoded by a FlashMemory cluster in dense mode (the
// whole KV resident: the baseline) and in sparse mode (the indexer's resident set), side by
// side: footprint, fidelity, mass recall, stalls, step latency and tokens/s.
#include "tools/fmctl/decode_demo.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "tools/fm_bench/bench.h"
#include "tools/replay/replay.h"

namespace fm::fmctl {
using bench::Percentile;

int DecodeDemo(const DecodeDemoOptions& o) {
  auto spec = PresetSpec(o.spec);
  if (!spec.ok()) {
    std::fprintf(stderr, "fmctl demo: %s\n", spec.status().ToString().c_str());
    return 1;
  }
  workload::SessionConfig c;
  c.spec = *spec;
  c.seed = o.seed;
  c.prefill_tokens = o.tokens;
  c.steps = o.steps;
  const auto g0 = std::chrono::steady_clock::now();
  auto g = workload::Session::Generate(c);
  if (!g.ok()) {
    std::fprintf(stderr, "fmctl demo: %s\n", g.status().ToString().c_str());
    return 1;
  }
  const replay::PrefillData prefill = replay::MakePrefill(**g);
  std::printf(
      "generated a %llu-token session (%s spec, %.0f MiB of KV, %u decode steps) in %.1f s\n",
      static_cast<unsigned long long>(o.tokens), o.spec.c_str(), prefill.pages.size() / 1048576.0,
      o.steps, std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count());
  auto client = decode::DecodeClient::Connect(o.target, 60000, o.security);
  if (!client.ok()) {
    std::fprintf(stderr, "fmctl demo: %s\n", client.status().ToString().c_str());
    return 1;
  }
  replay::ReplayResult res[2];
  const char* names[2] = {"dense", "sparse"};
  for (int m = 0; m < 2; ++m) {
    replay::ReplayOptions ro;
    ro.session_id = o.session + "-" + names[m];
    ro.mode = m == 0 ? decode::Mode::kDense : decode::Mode::kSparse;
    ro.budget = o.budget;
    ro.whole_step = o.whole_step;
    std::fprintf(stderr, "  %s: prefill and %u steps ...\n", names[m], o.steps);
    auto r = replay::Replay(**client, **g, prefill, ro);
    if (!r.ok()) {
      std::fprintf(stderr, "fmctl demo: %s: %s\n", names[m], r.status().ToString().c_str());
      return 1;
    }
    res[m] = std::move(*r);
  }
  const replay::Fidelity f = replay::Compare(*spec, res[1], res[0]);
  auto row = [&](const char* name, const std::string& a, const std::string& b) {
    std::printf("  %-30s %16s %16s\n", name, a.c_str(), b.c_str());
  };
  auto fmt = [](const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), f, v);
    return std::string(buf);
  };
  std::printf("\n  %-30s %16s %16s\n", "", "dense", "sparse");
  row("footprint (peak resident/KV)", fmt("%.1f %%", 100 * res[0].stats.footprint()),
      fmt("%.1f %%", 100 * res[1].stats.footprint()));
  row("peak resident KV", fmt("%.0f MiB", res[0].stats.peak_resident_bytes() / 1048576.0),
      fmt("%.0f MiB", res[1].stats.peak_resident_bytes() / 1048576.0));
  row("reserved cells", std::to_string(res[0].stats.reserve_pages()),
      std::to_string(res[1].stats.reserve_pages()));
  row("cosine vs dense (mean)", "1", fmt("%.5f", f.cosine_mean));
  row("cosine vs dense (min)", "1", fmt("%.5f", f.cosine_min));
  row("relative L2 vs dense (mean)", "0", fmt("%.5f", f.rel_l2_mean));
  row("mass recall", "1", fmt("%.4f", f.mass_recall));
  row("predictions / fetched / deferred", "-",
      std::to_string(res[1].stats.predictions()) + " / " +
          std::to_string(res[1].stats.pages_fetched()) + " / " +
          std::to_string(res[1].stats.pages_deferred()));
  row("stalled steps (ms waited)",
      std::to_string(res[0].stalled_at.size()) + fmt(" (%.1f)", res[0].stats.stall_ms()),
      std::to_string(res[1].stalled_at.size()) + fmt(" (%.1f)", res[1].stats.stall_ms()));
  row("prefill (s)", fmt("%.2f", res[0].prefill_s), fmt("%.2f", res[1].prefill_s));
  row("step p50 (ms)", fmt("%.2f", Percentile(res[0].step_ms, 0.5)),
      fmt("%.2f", Percentile(res[1].step_ms, 0.5)));
  row("step p99 (ms)", fmt("%.2f", Percentile(res[0].step_ms, 0.99)),
      fmt("%.2f", Percentile(res[1].step_ms, 0.99)));
  const double t0 = o.steps / res[0].decode_s, t1 = o.steps / res[1].decode_s;
  row("tokens/s (one session)", fmt("%.1f", t0), fmt("%.1f", t1));
  std::printf(
      "\n  sparse keeps %.1f %% of the KV resident (%.1fx less than dense) at mean cosine %.4f; "
      "%.2fx the dense tokens/s\n",
      100 * res[1].stats.footprint(),
      res[0].stats.footprint() / std::max(1e-9, res[1].stats.footprint()), f.cosine_mean, t1 / t0);
  return 0;
}

}  // namespace fm::fmctl
