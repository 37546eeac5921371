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
#include <thread>

#include "services/decode/decode_client.h"
#include "tests/process_util.h"
#include "tools/fm_bench/bench.h"
#include "tools/replay/replay.h"

namespace fm::bench {
namespace v1 = flashmemory::v1;

int RunFloodBench(const FloodBenchOptions& o) {
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.knobs.tau = 16;
  c.seed = 5;
  c.prefill_tokens = 4000;
  const uint32_t per_phase =
      static_cast<uint32_t>(std::ceil(o.seconds * 1000.0 / std::max(o.interval_ms, 0.05)));
  c.steps = (2 * per_phase / 16 + 1) * 16;  // a multiple of tau
  auto g = workload::Session::Generate(c);
  if (!g.ok()) return std::fprintf(stderr, "%s\n", g.status().ToString().c_str()), 1;
  const std::string dir = MakeTempDir("fm_flood");
  std::vector<std::string> args = {"--data_dir", dir, "--ram_bytes", "256MiB",
                                   "--reserve_bytes", "128MiB", "--max_batch_requests",
                                   std::to_string(o.max_batch_requests)};
  if (o.refused_bytes_per_s >= 0)
    args.insert(args.end(), {"--refused_bytes_per_s", std::to_string(o.refused_bytes_per_s)});
  auto server = ServerProcess::Start("flashmemory", args);
  if (!server.ok()) return std::fprintf(stderr, "%s\n", server.status().ToString().c_str()), 1;
  auto client = *decode::DecodeClient::Connect((*server)->target(), 30000);
  const replay::PrefillData prefill = replay::MakePrefill(**g);
  replay::ReplayOptions ro;
  ro.session_id = "victim";
  ro.budget = 0.25f;
  ro.policy = indexer::Policy::kQuest;
  replay::ReplayResult unused;
  if (absl::Status st = replay::OpenAndPrefill(*client, **g, prefill, ro, &unused); !st.ok())
    return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
  replay::StepSource src(**g, "victim", 16);
  auto stream = client->OpenStream();
  uint32_t next = 0;
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
        std::fprintf(stderr, "victim step %u failed\n", next);
        return {};
      }
    }
    return ms;
  };
  const std::vector<double> alone = phase(per_phase);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> flood_batches{0}, refused{0};
  std::vector<std::thread> floods;
  for (uint32_t f = 0; f < o.floods; ++f)
    floods.emplace_back([&, f] {
      auto fc = *decode::DecodeClient::Connect((*server)->target(), 30000);
      v1::DecodeBatch b;
      for (uint32_t i = 0; i < o.batch; ++i) {
        v1::LayerRequest r = src.Request(0, 0, 1);
        r.set_session_id("nobody-" + std::to_string(f) + "-" + std::to_string(i));
        *b.add_requests() = r;
      }
      while (!stop) {
        auto s = fc->OpenStream();
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
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the flood is on
  const std::vector<double> flooded = phase(per_phase);
  stop = true;
  for (auto& t : floods) t.join();
  (void)stream->Finish();
  if (alone.empty() || flooded.empty()) return 1;
  const double p50a = Percentile(alone, 0.5), p99a = Percentile(alone, 0.99);
  const double p50f = Percentile(flooded, 0.5), p99f = Percentile(flooded, 0.99);
  std::printf("victim step latency, a whole step every %.2f ms for %.1f s (%u steps) per phase "
              "(tiny spec, quest at 25 %%)\n",
              o.interval_ms, o.seconds, per_phase);
  std::printf("  %-34s %10s %10s\n", "", "p50 ms", "p99 ms");
  std::printf("  %-34s %10.2f %10.2f\n", "alone", p50a, p99a);
  std::printf("  %-34s %10.2f %10.2f\n",
              (std::to_string(o.floods) + " streams flooding, " + std::to_string(o.batch) +
               "-request batches")
                  .c_str(),
              p50f, p99f);
  std::printf("  flood_p99_ratio %.2f (target <= 2); flood batches answered %llu, refused whole "
              "%llu\n",
              p99f / p99a, static_cast<unsigned long long>(flood_batches.load()),
              static_cast<unsigned long long>(refused.load()));
  if (!o.json.empty())
    WriteJsonObject(o.json, {{"p50_alone_ms", p50a},
                             {"p99_alone_ms", p99a},
                             {"p50_flood_ms", p50f},
                             {"p99_flood_ms", p99f},
                             {"flood_p99_ratio", p99f / p99a},
                             {"flood_batches", double(flood_batches.load())},
                             {"refused_batches", double(refused.load())}});
  (*server)->Stop(SIGTERM);
  return 0;
}

}  // namespace fm::bench
