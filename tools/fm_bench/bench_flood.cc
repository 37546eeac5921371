// fm-bench flood: what a flooding client costs another session. Starts an all-in-one server,
// steps one sparse session (tiny spec) alone, a whole step every `interval_ms` for `seconds`,
// then again while `floods` other streams send batches of `batch` requests for sessions that
// do not exist, as fast as the server answers; prints the victim's step latency (p50, p99)
// in both phases and their ratio. The figure the reliability issue bounds is
// flood_p99_ratio (target <= 2). The phases last seconds, not a few hundred steps, so the
// flood's bursts (a refused batch, then the throttle's wait) fall inside them.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "services/decode/decode_client.h"
#include "tests/process_util.h"
#include "tools/fm_bench/bench.h"
#include "tools/replay/replay.h"

namespace fm::bench {
namespace v1 = flashmemory::v1;

absl::StatusOr<FloodFigures> MeasureFlood(const std::string& target,
                                          const ClientSecurity& security,
                                          const FloodBenchOptions& o, const std::string& victim) {
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.knobs.tau = 16;
  c.seed = 5;
  c.prefill_tokens = 4000;
  const uint32_t per_phase =
      static_cast<uint32_t>(std::ceil(o.seconds * 1000.0 / std::max(o.interval_ms, 0.05)));
  c.steps = (2 * per_phase / 16 + 1) * 16;  // a multiple of tau
  auto g = workload::Session::Generate(c);
  if (!g.ok()) return g.status();
  auto client = decode::DecodeClient::Connect(target, 30000, security);
  if (!client.ok()) return client.status();
  const replay::PrefillData prefill = replay::MakePrefill(**g);
  replay::ReplayOptions ro;
  ro.session_id = victim;
  ro.budget = 0.25f;
  ro.policy = indexer::Policy::kQuest;
  replay::ReplayResult unused;
  if (absl::Status st = replay::OpenAndPrefill(**client, **g, prefill, ro, &unused); !st.ok())
    return st;
  replay::StepSource src(**g, victim, 16);
  auto stream = (*client)->OpenStream();
  uint32_t next = 0;
  absl::Status failed;
  auto phase = [&](uint32_t steps) -> std::vector<double> {
    std::vector<double> ms;
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t i = 0; i < steps; ++i, ++next) {
      v1::DecodeBatch b;
      *b.add_requests() = src.Request(next, 0, g.value()->spec().layers);
      std::this_thread::sleep_until(
          start + std::chrono::microseconds(static_cast<int64_t>(i * o.interval_ms * 1e3)));
      const auto t0 = std::chrono::steady_clock::now();
      auto r = stream->Run(b);
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      if (!r.ok() || r->results(0).code() != 0) {
        failed = r.ok() ? absl::InternalError(absl::StrCat("victim step ", next, ": ",
                                                           r->results(0).message()))
                        : r.status();
        return {};
      }
    }
    return ms;
  };
  FloodFigures f;
  const std::vector<double> alone = phase(per_phase);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> flood_batches{0}, refused{0};
  std::vector<std::thread> floods;
  for (uint32_t k = 0; k < o.floods && !alone.empty(); ++k)
    floods.emplace_back([&, k] {
      auto fc = decode::DecodeClient::Connect(target, 30000, security);
      if (!fc.ok()) return;
      v1::DecodeBatch b;
      for (uint32_t i = 0; i < o.batch; ++i) {
        v1::LayerRequest r = src.Request(0, 0, 1);
        r.set_session_id("nobody-" + std::to_string(k) + "-" + std::to_string(i));
        *b.add_requests() = r;
      }
      while (!stop) {
        auto s = (*fc)->OpenStream();
        while (!stop) {
          auto r = s->Run(b);
          if (!r.ok()) {  // refused whole (beyond --max_batch_requests): a new stream
            ++refused;
            break;
          }
          ++flood_batches;
        }
      }
    });
  if (!alone.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::vector<double> flooded = alone.empty() ? alone : phase(per_phase);
  stop = true;
  for (auto& t : floods) t.join();
  (void)stream->Finish();
  (void)(*client)->Close(victim, true);
  if (alone.empty() || flooded.empty()) return failed;
  f.steps_per_phase = per_phase;
  f.p50_alone = Percentile(alone, 0.5);
  f.p99_alone = Percentile(alone, 0.99);
  f.p50_flood = Percentile(flooded, 0.5);
  f.p99_flood = Percentile(flooded, 0.99);
  f.ratio = f.p99_flood / f.p99_alone;
  f.batches = flood_batches.load();
  f.refused = refused.load();
  return f;
}

void PrintFlood(const FloodBenchOptions& o, const FloodFigures& f) {
  std::printf("victim step latency, a whole step every %.2f ms for %.1f s (%u steps) per phase "
              "(tiny spec, quest at 25 %%)\n",
              o.interval_ms, o.seconds, f.steps_per_phase);
  std::printf("  %-34s %10s %10s\n", "", "p50 ms", "p99 ms");
  std::printf("  %-34s %10.2f %10.2f\n", "alone", f.p50_alone, f.p99_alone);
  std::printf("  %-34s %10.2f %10.2f\n",
              (std::to_string(o.floods) + " streams flooding, " + std::to_string(o.batch) +
               "-request batches")
                  .c_str(),
              f.p50_flood, f.p99_flood);
  std::printf("  flood_p99_ratio %.2f (target <= 2); flood batches answered %llu, refused whole "
              "%llu\n",
              f.ratio, static_cast<unsigned long long>(f.batches),
              static_cast<unsigned long long>(f.refused));
}

int RunFloodBench(const FloodBenchOptions& o) {
  const std::string dir = MakeTempDir("fm_flood");
  std::vector<std::string> args = {"--data_dir", dir, "--ram_bytes", "256MiB",
                                   "--reserve_bytes", "128MiB", "--max_batch_requests",
                                   std::to_string(o.max_batch_requests)};
  if (o.refused_bytes_per_s >= 0)
    args.insert(args.end(), {"--refused_bytes_per_s", std::to_string(o.refused_bytes_per_s)});
  auto server = ServerProcess::Start("flashmemory", args);
  if (!server.ok()) return std::fprintf(stderr, "%s\n", server.status().ToString().c_str()), 1;
  auto f = MeasureFlood((*server)->target(), {}, o, "victim");
  (*server)->Stop(SIGTERM);
  std::filesystem::remove_all(dir);
  if (!f.ok()) return std::fprintf(stderr, "%s\n", f.status().ToString().c_str()), 1;
  PrintFlood(o, *f);
  if (!o.json.empty())
    WriteJsonObject(o.json, {{"p50_alone_ms", f->p50_alone},
                             {"p99_alone_ms", f->p99_alone},
                             {"p50_flood_ms", f->p50_flood},
                             {"p99_flood_ms", f->p99_flood},
                             {"flood_p99_ratio", f->ratio},
                             {"flood_batches", double(f->batches)},
                             {"refused_batches", double(f->refused)}});
  return 0;
}

}  // namespace fm::bench
