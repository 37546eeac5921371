// fm-bench e2e: the whole cluster, dense against sparse, on generated sessions (bench spec
// below 512K tokens, long spec from 512K). Per context: one session decoded in both modes
// (footprint, fidelity, mass recall, needle hits, stalls, latency), then N concurrent
// sessions per mode, each decoding per layer (as a real engine calls it) and then in whole
// steps (replay), for aggregate tokens/s; then the concurrency ceiling of the worker's
// reserve: how many sessions of that context the admission accepts, dense vs sparse.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/process_util.h"
#include "tools/fm_bench/bench.h"
#include "tools/replay/replay.h"

namespace fm::bench {
namespace {

struct ConcResult {
  double tps_layer = 0, tps_whole = 0, p50 = 0, p99 = 0;
  uint64_t stalled = 0, steps = 0;
  uint64_t catch_up_stalls = 0;  // of the stalled steps, those waiting for a catch-up
  double stall_ms = 0;           // the time the stalled steps waited, in all
};

// Opens and prefills n sessions of one mode, decodes conc_steps per layer on n threads and
// then conc_steps in whole steps, and deletes them.
absl::StatusOr<ConcResult> Concurrent(decode::DecodeClient& client, const workload::Session& g,
                                      const replay::PrefillData& prefill, decode::Mode mode,
                                      double budget, indexer::Policy policy, int n,
                                      uint32_t conc_steps, const std::string& prefix) {
  std::vector<replay::ReplayResult> res(n);
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) {
    ids.push_back(absl::StrCat(prefix, "-", i));
    replay::ReplayOptions ro;
    ro.session_id = ids.back();
    ro.mode = mode;
    ro.budget = static_cast<float>(budget);
    ro.policy = policy;
    if (absl::Status st = replay::OpenAndPrefill(client, g, prefill, ro, &res[i]); !st.ok())
      return st;
  }
  ConcResult out;
  for (int style = 0; style < 2; ++style) {
    std::vector<absl::Status> status(n);
    std::vector<std::thread> th;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i)
      th.emplace_back([&, i] {
        auto stream = client.OpenStream();
        status[i] = replay::DecodeSteps(client, *stream, g, ids[i], style * conc_steps,
                                        (style + 1) * conc_steps, style == 1, &res[i]);
        if (status[i].ok()) status[i] = stream->Finish();
      });
    for (auto& t : th) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& st : status)
      if (!st.ok()) return st;
    (style == 0 ? out.tps_layer : out.tps_whole) = double(n) * conc_steps / s;
  }
  std::vector<double> lat;
  for (int i = 0; i < n; ++i) {
    // Per-layer steps only (the first conc_steps of each session).
    lat.insert(lat.end(), res[i].step_ms.begin(), res[i].step_ms.begin() + conc_steps);
    out.stalled += res[i].stalled_at.size();
    out.steps += res[i].step_ms.size();
    auto stats = client.Stats(ids[i]);
    if (!stats.ok()) return stats.status();
    out.stall_ms += stats->stall_ms();
    out.catch_up_stalls += stats->catch_up_stalls();
    if (absl::Status st = client.Close(ids[i], true); !st.ok()) return st;
  }
  out.p50 = Percentile(lat, 0.5);
  out.p99 = Percentile(lat, 0.99);
  return out;
}

// Sessions of `max_tokens` the admission accepts before RESOURCE_EXHAUSTED.
absl::StatusOr<int> Ceiling(decode::DecodeClient& client, const ModelSpec& spec, decode::Mode mode,
                            double budget, uint64_t max_tokens, const std::string& prefix) {
  int n = 0;
  absl::Status st;
  for (; n < 100000; ++n) {
    decode::SessionOptions so;
    so.spec = spec;
    so.mode = mode;
    so.budget = static_cast<float>(budget);
    so.max_tokens = max_tokens;
    auto r = client.Open(absl::StrCat(prefix, "-", n), so);
    if (!r.ok()) {
      st = r.status();
      break;
    }
  }
  for (int i = 0; i < n; ++i) (void)client.Close(absl::StrCat(prefix, "-", i), true);
  if (!absl::IsResourceExhausted(st)) return st;
  return n;
}

}  // namespace

int RunE2eBench(const E2eBenchOptions& o) {
  // A worker's reserve holds pages of one size, so the bench starts a fresh flashmemory per
  // model spec (a --target worker serves the contexts of one spec).
  std::unique_ptr<ServerProcess> server;
  std::string target = o.target, dir, served_spec;
  std::unique_ptr<decode::DecodeClient> client;
  auto start = [&](const std::string& spec_name) -> bool {
    if (client && (!o.target.empty() || spec_name == served_spec)) return true;
    client.reset();
    if (o.target.empty()) {
      server.reset();
      if (!dir.empty()) std::filesystem::remove_all(dir);
      dir = MakeTempDir("fm_e2e");
      std::vector<std::string> args = {"--data_dir", dir, "--ram_bytes",
                                       std::to_string(o.server_ram), "--reserve_bytes",
                                       std::to_string(o.server_reserve)};
      if (o.miss_check) args.insert(args.end(), {"--miss_check", "true"});
      args.insert(args.end(), o.server_flags.begin(), o.server_flags.end());
      auto s = ServerProcess::Start("flashmemory", args);
      if (!s.ok()) {
        std::fprintf(stderr, "fm-bench e2e: %s\n", s.status().ToString().c_str());
        return false;
      }
      server = std::move(*s);
      target = server->target();
    }
    auto c = decode::DecodeClient::Connect(target, 600000, o.security);
    if (!c.ok()) {
      std::fprintf(stderr, "fm-bench e2e: %s\n", c.status().ToString().c_str());
      return false;
    }
    client = std::move(*c);
    served_spec = spec_name;
    std::printf("fm-bench e2e: decode worker %s%s for the %s spec\n", target.c_str(),
                server ? " (flashmemory started by the bench)" : "", spec_name.c_str());
    return true;
  };
  std::printf("fm-bench e2e: sparse budget (footprint cap) %.1f %% at 128K (bench spec), %.1f %% "
              "at 1M (long spec)%s\n",
              100 * o.budget, 100 * o.long_budget,
              o.flat_budget ? ", the same at every context" : "; other contexts x (n / that)^-1/3");
  auto parsed = indexer::ParsePolicy(o.policy);
  if (!parsed.ok()) {
    std::fprintf(stderr, "fm-bench e2e: %s\n", parsed.status().ToString().c_str());
    return 1;
  }
  const indexer::Policy policy = *parsed;
  std::vector<std::string> rows;
  int failures = 0;
  for (size_t ci = 0; ci < o.contexts.size(); ++ci) {
    const uint64_t context = o.contexts[ci];
    const bool long_spec = context >= (512u << 10);
    const ModelSpec spec = *PresetSpec(long_spec ? "long" : "bench");
    const double anchor_cap = long_spec ? o.long_budget : o.budget;
    const double budget = o.flat_budget
                              ? anchor_cap
                              : ContextBudget(anchor_cap, long_spec ? (1u << 20) : (128u << 10),
                                              context);
    if (!start(spec.name)) return 1;
    workload::SessionConfig c;
    c.spec = spec;
    c.seed = o.seed + context / 32768 - 1;  // per context, whatever the list
    c.prefill_tokens = context;
    c.knobs.tau = long_spec ? o.long_tau : o.tau;  // the sessions' cycles (replay passes it)
    const uint32_t tau = c.knobs.tau;
    c.steps = (std::max(o.steps, 2 * o.conc_steps) + tau - 1) / tau * tau;
    const auto g0 = std::chrono::steady_clock::now();
    auto gs = workload::Session::Generate(c);
    if (!gs.ok()) {
      std::fprintf(stderr, "fm-bench e2e: %s\n", gs.status().ToString().c_str());
      return 1;
    }
    const workload::Session& g = **gs;
    const replay::PrefillData prefill = replay::MakePrefill(g);
    const double kv_gib = double(spec.KvBytesPerToken()) * (context + c.steps) / (1ull << 30);
    std::fprintf(stderr,
                 "fm-bench e2e: %llu tokens (%s spec, %.2f GiB of KV) generated in %.1f s\n",
                 static_cast<unsigned long long>(context), spec.name.c_str(), kv_gib,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count());

    // One session per mode: fidelity, footprint, needles, stalls; per layer, then the last
    // conc_steps in whole steps.
    const uint32_t split = c.steps - o.conc_steps;
    auto run_pair = [&](const workload::Session& gg, const replay::PrefillData& pf,
                        replay::ReplayResult* pair, double* secs) -> bool {
      for (int m = 0; m < 2; ++m) {
        replay::ReplayOptions ro;
        ro.session_id = absl::StrCat("e2e-", context, m ? "-sparse" : "-dense");
        ro.mode = m ? decode::Mode::kSparse : decode::Mode::kDense;
        ro.budget = static_cast<float>(budget);
        ro.policy = policy;
        ro.miss_ratio = static_cast<float>(o.miss_ratio);
        replay::ReplayResult& r = pair[m];
        absl::Status st = replay::OpenAndPrefill(*client, gg, pf, ro, &r);
        auto stream = client->OpenStream();
        if (st.ok())
          st = replay::DecodeSteps(*client, *stream, gg, ro.session_id, 0, split, false, &r);
        secs[m] = r.decode_s;
        if (st.ok())
          st = replay::DecodeSteps(*client, *stream, gg, ro.session_id, split, c.steps, true, &r);
        if (st.ok()) st = stream->Finish();
        if (st.ok()) {
          auto stats = client->Stats(ro.session_id);
          st = stats.status();
          if (stats.ok()) r.stats = *stats;
        }
        if (st.ok()) st = client->Close(ro.session_id, true);
        if (!st.ok()) {
          std::fprintf(stderr, "fm-bench e2e: %s: %s\n", ro.session_id.c_str(),
                       st.ToString().c_str());
          return false;
        }
      }
      return true;
    };
    replay::ReplayResult one[2];
    double layer_s[2] = {0, 0};  // decode time of the per-layer steps
    if (!run_pair(g, prefill, one, layer_s)) return 1;
    const replay::Fidelity f = replay::Compare(spec, one[1], one[0]);
    std::printf("\n%llu tokens (%s spec): %.2f GiB of KV per session; sparse cap %.1f %%, cycles "
                "of %u steps, switch lag %u\n",
                static_cast<unsigned long long>(context), spec.name.c_str(), kv_gib, 100 * budget,
                one[1].stats.tau(), one[1].stats.switch_lag());
    std::printf("  %-8s %9s %8s %8s %8s %8s %9s %9s %9s %10s %10s\n", "mode", "footprint", "cosine",
                "cos_min", "rel_l2", "mass_rec", "needles", "stall_fr", "p50_ms", "p99_ms",
                "tok/s");
    for (int m = 0; m < 2; ++m) {
      const replay::ReplayResult& r = one[m];
      std::vector<double> lat(r.step_ms.begin(), r.step_ms.begin() + split);
      const double stall = double(r.stalled_at.size()) / r.step_ms.size();
      std::printf("  %-8s %8.2f%% %8.5f %8.5f %8.5f %8.4f %9s %9.4f %9.2f %10.2f %10.2f\n",
                  m ? "sparse" : "dense", 100 * r.stats.footprint(), m ? f.cosine_mean : 1.0,
                  m ? f.cosine_min : 1.0, m ? f.rel_l2_mean : 0.0, m ? f.mass_recall : 1.0,
                  absl::StrCat(r.needle_hits, "/", r.needles).c_str(), stall, Percentile(lat, 0.5),
                  Percentile(lat, 0.99), split / layer_s[m]);
    }

    // Concurrency: sessions per context, capped by the KV the machine holds per mode.
    const int cap =
        std::max<int>(2, static_cast<int>(o.ram_cap / (double(spec.KvBytesPerToken()) * context)));
    std::vector<int> ns;
    for (int n : o.sessions)
      if (n <= cap) ns.push_back(n);
    if (cap < o.sessions.back() && (ns.empty() || ns.back() != cap)) ns.push_back(cap);
    std::printf("  %-8s %8s %12s %14s %10s %10s %8s %8s %9s\n", "mode", "sessions",
                "tok/s(layer)", "tok/s(whole)", "p50_ms", "p99_ms", "stalls", "catch_up",
                "stall_ms");
    std::map<std::pair<int, int>, ConcResult> conc;
    for (int m = 0; m < 2; ++m)
      for (int n : ns) {
        ConcResult cr;
        if (n == 1) {
          const replay::ReplayResult& r = one[m];
          std::vector<double> lat(r.step_ms.begin(), r.step_ms.begin() + split);
          double whole = 0;
          for (size_t i = split; i < r.step_ms.size(); ++i) whole += r.step_ms[i];
          cr.tps_layer = split / layer_s[m];
          cr.tps_whole = o.conc_steps / (whole / 1000);
          cr.p50 = Percentile(lat, 0.5);
          cr.p99 = Percentile(lat, 0.99);
          cr.stalled = r.stalled_at.size();
          cr.stall_ms = r.stats.stall_ms();
          cr.catch_up_stalls = r.stats.catch_up_stalls();
          cr.steps = r.step_ms.size();
        } else {
          auto r = Concurrent(*client, g, prefill,
                              m ? decode::Mode::kSparse : decode::Mode::kDense, budget, policy, n,
                              o.conc_steps, absl::StrCat("e2e-", context, "-", m, "-", n));
          if (!r.ok()) {
            std::fprintf(stderr, "fm-bench e2e: %d concurrent %s sessions: %s\n", n,
                         m ? "sparse" : "dense", r.status().ToString().c_str());
            ++failures;
            continue;
          }
          cr = *r;
        }
        conc[{m, n}] = cr;
        std::printf("  %-8s %8d %12.2f %14.2f %10.2f %10.2f %8llu %8llu %9.1f\n",
                    m ? "sparse" : "dense", n, cr.tps_layer, cr.tps_whole, cr.p50, cr.p99,
                    static_cast<unsigned long long>(cr.stalled),
                    static_cast<unsigned long long>(cr.catch_up_stalls), cr.stall_ms);
        std::fflush(stdout);
      }

    // The concurrency ceiling of the worker's reserve.
    int ceiling[2] = {0, 0};
    for (int m = 0; m < 2; ++m) {
      auto r = Ceiling(*client, spec, m ? decode::Mode::kSparse : decode::Mode::kDense, budget,
                       context + c.steps, absl::StrCat("ceil-", context, "-", m));
      if (!r.ok()) {
        std::fprintf(stderr, "fm-bench e2e: ceiling: %s\n", r.status().ToString().c_str());
        ++failures;
      } else {
        ceiling[m] = *r;
      }
    }
    std::printf("  concurrency ceiling of a %.1f GiB reserve: dense %d, sparse %d (%.1fx)\n",
                o.server_reserve / double(1ull << 30), ceiling[0], ceiling[1],
                ceiling[0] ? double(ceiling[1]) / ceiling[0] : 0.0);
    if (conc.count({0, ns.back()}) && conc.count({1, ns.back()}))
      std::printf("  sparse / dense tokens/s at %d sessions: %.2fx per layer, %.2fx whole steps\n",
                  ns.back(), conc[{1, ns.back()}].tps_layer / conc[{0, ns.back()}].tps_layer,
                  conc[{1, ns.back()}].tps_whole / conc[{0, ns.back()}].tps_whole);
    std::fflush(stdout);

    // Fidelity over more sessions of the same context (one session says little: their
    // structure varies), one pair at a time.
    struct Agg {
      double cos_sum = 0, cos_min = 1, rel_sum = 0, mass_sum = 0;
      uint64_t hits = 0, needles = 0, stalls = 0, catch_up_stalls = 0, steps = 0;
      double footprint = 0, stall_ms = 0;
      std::vector<double> mass;
      std::vector<int> recovery;  // steps until a missed needle's page was resident (-1: not)
      std::vector<uint32_t> miss_cycle_steps;  // a missed needle's step within its cycle
      std::string stalled_at;     // per session: the steps that stalled
    } agg;
    auto add = [&](const replay::Fidelity& fk, const replay::ReplayResult& sparse) {
      agg.cos_sum += fk.cosine_mean;
      agg.cos_min = std::min(agg.cos_min, fk.cosine_min);
      agg.rel_sum += fk.rel_l2_mean;
      agg.mass_sum += fk.mass_recall;
      agg.mass.push_back(fk.mass_recall);
      agg.hits += sparse.needle_hits;
      agg.needles += sparse.needles;
      agg.stalls += sparse.stalled_at.size();
      agg.stall_ms += sparse.stats.stall_ms();
      agg.catch_up_stalls += sparse.stats.catch_up_stalls();
      agg.steps += sparse.step_ms.size();
      agg.footprint = std::max(agg.footprint, sparse.stats.footprint());
      agg.recovery.insert(agg.recovery.end(), sparse.needle_recovery_steps.begin(),
                          sparse.needle_recovery_steps.end());
      agg.miss_cycle_steps.insert(agg.miss_cycle_steps.end(),
                                  sparse.needle_miss_cycle_steps.begin(),
                                  sparse.needle_miss_cycle_steps.end());
      absl::StrAppend(&agg.stalled_at, agg.stalled_at.empty() ? "[" : ", [",
                      absl::StrJoin(sparse.stalled_at, ", "), "]");
    };
    add(f, one[1]);
    for (int k = 1; k < o.fidelity_sessions; ++k) {
      workload::SessionConfig ck = c;
      ck.seed = c.seed + 1000003ull * k;
      auto gk = workload::Session::Generate(ck);
      if (!gk.ok()) {
        std::fprintf(stderr, "fm-bench e2e: %s\n", gk.status().ToString().c_str());
        return 1;
      }
      const replay::PrefillData pk = replay::MakePrefill(**gk);
      replay::ReplayResult pair[2];
      double secs[2];
      if (!run_pair(**gk, pk, pair, secs)) return 1;
      const replay::Fidelity fk = replay::Compare(spec, pair[1], pair[0]);
      add(fk, pair[1]);
      std::printf("  session %d (seed %llu): footprint %.2f%%, cosine %.5f, mass recall %.4f, "
                  "needles %llu/%llu, stalls %llu (%llu catch-up; %.1f ms waited)\n",
                  k + 1, static_cast<unsigned long long>(ck.seed), 100 * pair[1].stats.footprint(),
                  fk.cosine_mean, fk.mass_recall,
                  static_cast<unsigned long long>(pair[1].needle_hits),
                  static_cast<unsigned long long>(pair[1].needles),
                  static_cast<unsigned long long>(pair[1].stalled_at.size()),
                  static_cast<unsigned long long>(pair[1].stats.catch_up_stalls()),
                  pair[1].stats.stall_ms());
      std::fflush(stdout);
    }
    const double nf = static_cast<double>(agg.mass.size());
    const double stall_fr = agg.steps ? double(agg.stalls) / agg.steps : 0.0;
    const double steady_stall_fr =
        agg.steps ? double(agg.stalls - agg.catch_up_stalls) / agg.steps : 0.0;
    const std::string per_session = absl::StrJoin(agg.mass, ", ");
    std::printf("  sparse over %d sessions: footprint <= %.2f%%, cosine %.5f (min %.5f), mass "
                "recall %.4f (%s), needles %llu/%llu, stall fraction %.4f (%llu of %llu steps, "
                "%llu waiting for a catch-up after a set change; %.1f ms waited), steady-state "
                "stall fraction %.4f\n",
                static_cast<int>(nf), 100 * agg.footprint, agg.cos_sum / nf, agg.cos_min,
                agg.mass_sum / nf, per_session.c_str(), static_cast<unsigned long long>(agg.hits),
                static_cast<unsigned long long>(agg.needles),
                stall_fr, static_cast<unsigned long long>(agg.stalls),
                static_cast<unsigned long long>(agg.steps),
                static_cast<unsigned long long>(agg.catch_up_stalls), agg.stall_ms,
                steady_stall_fr);
    const std::string recovery = absl::StrJoin(agg.recovery, ", ");
    if (!agg.recovery.empty())
      std::printf("  missed needles: at step [%s] of their cycles; page resident after [%s] steps "
                  "(-1: not within %u)\n",
                  absl::StrJoin(agg.miss_cycle_steps, ", ").c_str(), recovery.c_str(),
                  replay::kNeedleWatchSteps);
    if (agg.stalls) std::printf("  stalled steps per session: %s\n", agg.stalled_at.c_str());
    std::fflush(stdout);

    for (int m = 0; m < 2; ++m)
      for (int n : ns) {
        if (!conc.count({m, n})) continue;
        const ConcResult& cr = conc[{m, n}];
        const replay::ReplayResult& r = one[m];
        char row[2048];
        std::snprintf(
            row, sizeof(row),
            "{\"context\": %llu, \"mode\": \"%s\", \"sessions\": %d, \"budget\": %.4f, "
            "\"footprint\": %.6f, "
            "\"cosine\": %.6f, \"cosine_min\": %.6f, \"rel_l2\": %.6f, \"mass_recall\": %.6f, "
            "\"needle_hit\": %.6f, \"stall_fraction\": %.6f, \"step_p50_ms\": %.4f, "
            "\"step_p99_ms\": %.4f, \"tokens_per_s\": %.4f, \"tokens_per_s_whole_step\": %.4f, "
            "\"concurrency_dense\": %d, \"concurrency_sparse\": %d, \"fidelity_sessions\": %d, "
            "\"mass_recall_sessions\": [%s], \"tau\": %u, \"switch_lag\": %u, "
            "\"miss_check\": %s, \"miss_ratio\": %g, \"needle_recovery_steps\": [%s], \"fidelity_stall_ms\": %.3f, "
            "\"stall_ms\": %.3f, \"catch_up_stalls\": %llu, \"fidelity_stall_fraction\": %.6f, "
            "\"fidelity_steady_stall_fraction\": %.6f}",
            static_cast<unsigned long long>(context), m ? "sparse" : "dense", n,
            m ? budget : 1.0, m ? agg.footprint : r.stats.footprint(),
            m ? agg.cos_sum / nf : 1.0, m ? agg.cos_min : 1.0, m ? agg.rel_sum / nf : 0.0,
            m ? agg.mass_sum / nf : 1.0,
            m ? (agg.needles ? double(agg.hits) / agg.needles : 1.0)
              : (r.needles ? double(r.needle_hits) / r.needles : 1.0),
            cr.steps ? double(cr.stalled) / cr.steps : 0.0, cr.p50, cr.p99, cr.tps_layer,
            cr.tps_whole, ceiling[0], ceiling[1], static_cast<int>(nf),
            m ? per_session.c_str() : "1", r.stats.tau(), r.stats.switch_lag(),
            o.miss_check ? "true" : "false", o.miss_ratio, m ? recovery.c_str() : "", m ? agg.stall_ms : 0.0,
            cr.stall_ms, static_cast<unsigned long long>(cr.catch_up_stalls),
            m ? stall_fr : 0.0, m ? steady_stall_fr : 0.0);
        rows.push_back(row);
      }
    if (!o.json.empty()) WriteJsonRows(o.json, rows);  // after every context: long runs
  }
  if (!o.plots.empty() && !o.json.empty()) {
    std::filesystem::create_directories(o.plots);
    const std::string cmd = absl::StrCat("/usr/bin/python3 ", FM_SOURCE_DIR,
                                         "/scripts/plot_e2e.py ", o.json, " ", o.plots);
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "fm-bench e2e: plotting failed\n");
  }
  if (server) {
    server->Stop(SIGTERM);
    std::filesystem::remove_all(dir);
  }
  return failures ? 1 : 0;
}

}  // namespace fm::bench
