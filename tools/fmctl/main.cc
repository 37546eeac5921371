// fmctl: command-line client of a FlashMemory cluster.
//   fmctl demo  --target HOST:PORT   decode a generated long session in dense and in sparse
//                                    mode; footprint, fidelity, mass recall, stalls, tokens/s
//   fmctl kv-demo --target HOST:PORT store a generated long session and read it back over
//                                    UCX and gRPC, show tiers, spill and throughput
//   fmctl stats --target HOST:PORT [--session ID]
//   fmctl delete --target HOST:PORT --session ID
//   fmctl load-weights --target HOST:PORT[,HOST:PORT...] FILE
//                                    load indexer weights (safetensors, a path the indexer
//                                    reads) on every indexer replica; prints the hash
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/strings/str_format.h"
#include "common/codecs.h"
#include "common/flags.h"
#include "common/model_spec.h"
#include "common/status.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"
#include "tools/fmctl/decode_demo.h"
#include "workload/trace.h"

namespace {

// What fmctl presents to the servers (--tls_ca, --tls_cert, --tls_key, --token).
fm::ClientSecurity g_security;

using Clock = std::chrono::steady_clock;

// A progress bar on stderr, redrawn in place.
void Bar(const char* what, uint64_t done, uint64_t total, Clock::time_point t0) {
  static const bool tty = isatty(2);
  if (!tty && done != total) return;  // logs get one line per step
  double frac = total ? static_cast<double>(done) / total : 1;
  int filled = static_cast<int>(frac * 30);
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::fprintf(stderr, "\r  %-28s [%.*s%*s] %3.0f%% %6llu/%llu  %5.1fs", what, filled,
               "==============================", 30 - filled, "", 100 * frac,
               static_cast<unsigned long long>(done), static_cast<unsigned long long>(total), s);
  if (done == total) std::fprintf(stderr, "\n");
}

// K/V of one page of a synthetic session in the spec's layout: bf16/fp16/fp32 values from a
// seeded normal distribution (real K/V are roughly Gaussian per channel).
std::string MakePage(const fm::ModelSpec& spec, uint64_t page, uint32_t tokens, uint64_t seed) {
  std::string out(spec.PageBytes(), '\0');
  std::mt19937_64 rng(seed * 1000003 + page);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  size_t elem = fm::DTypeSize(spec.dtype);
  for (uint32_t l = 0; l < spec.layers; ++l)
    for (uint32_t kv = 0; kv < 2; ++kv)
      for (uint32_t h = 0; h < spec.kv_heads; ++h)
        for (uint32_t t = 0; t < tokens; ++t) {
          size_t off = spec.ElemOffset(l, kv, h, t) * elem;
          for (uint32_t d = 0; d < spec.head_dim; ++d) {
            float v = dist(rng);
            if (spec.dtype == fm::DType::kBf16) {
              uint16_t b = fm::FloatToBf16(v);
              std::memcpy(&out[off + d * 2], &b, 2);
            } else if (spec.dtype == fm::DType::kFp16) {
              uint16_t b = fm::FloatToFp16(v);
              std::memcpy(&out[off + d * 2], &b, 2);
            } else {
              std::memcpy(&out[off + d * 4], &v, 4);
            }
          }
        }
  return out;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "\nfmctl: %s\n", s.ToString().c_str());
  return 1;
}

int Demo(const std::string& target, const std::string& spec_name, uint64_t tokens,
         const std::string& session) {
  auto spec = fm::PresetSpec(spec_name);
  if (!spec.ok()) return Fail(spec.status());
  fm::KvClientOptions co;
  co.security = g_security;
  co.max_message_bytes = 64 << 20;
  auto client = fm::KvClient::Connect(target, co);
  if (!client.ok()) return Fail(client.status());
  fm::KvClient& c = **client;
  uint64_t pages = spec->PagesForTokens(tokens);
  uint64_t spec_hash = fm::ModelSpecHash(*spec);
  std::printf("FlashMemory demo against %s\n", target.c_str());
  std::printf("  model spec \"%s\": L=%u Hq=%u Hkv=%u d=%u %s, page %u tokens = %.2f MiB\n",
              spec->name.c_str(), spec->layers, spec->q_heads, spec->kv_heads, spec->head_dim,
              fm::DTypeName(spec->dtype), spec->page_tokens, spec->PageBytes() / 1048576.0);
  std::printf("  session \"%s\": %llu tokens in %llu pages, %.1f MiB of KV; data path: %s\n",
              session.c_str(), static_cast<unsigned long long>(tokens),
              static_cast<unsigned long long>(pages), pages * spec->PageBytes() / 1048576.0,
              c.has_ucx() ? "UCX + gRPC" : "gRPC only");
  auto del = c.DeleteSession(session);  // a previous run's leftovers
  (void)del;

  // Prefill: seal every page into the store, alternating the two write paths.
  auto t0 = Clock::now();
  double put_s = 0;
  std::vector<uint64_t> checksums(pages);
  for (uint64_t p = 0; p < pages; ++p) {
    uint32_t valid = static_cast<uint32_t>(
        std::min<uint64_t>(spec->page_tokens, tokens - p * spec->page_tokens));
    std::string payload = MakePage(*spec, p, valid, 7);
    auto h = fm::MakePageHeader(session, p, spec_hash, valid, spec->dtype, payload.data(),
                                payload.size());
    checksums[p] = h.checksum;
    auto tp = Clock::now();
    absl::Status s =
        (c.has_ucx() && p % 2) ? c.PutUcx(h, payload.data()) : c.Put(h, payload.data());
    put_s += std::chrono::duration<double>(Clock::now() - tp).count();
    if (!s.ok()) return Fail(s);
    if (p % 8 == 0 || p + 1 == pages) Bar("prefill (put pages)", p + 1, pages, t0);
  }

  // Decode-style reads: a sink page, the recent tail and a spread of older pages, as a
  // resident set for one cycle would fetch; then every page once over each path.
  std::vector<fm::PageRef> all;
  for (uint64_t p = 0; p < pages; ++p) all.push_back({session, p});
  const uint64_t record_bytes = spec->PageBytes() + fm::kPageHeaderBytes;
  std::unique_ptr<fm::UcxRegion> landing;
  if (c.has_ucx()) {
    auto region = c.engine()->MapRegion(16 * record_bytes);
    if (!region.ok()) return Fail(region.status());
    landing = std::move(*region);
  }
  auto read_all = [&](bool ucx, const char* label, uint64_t first, double* secs) -> absl::Status {
    auto t = Clock::now();
    for (uint64_t p = first; p < pages; p += 16) {
      std::vector<fm::PageRef> b(all.begin() + p, all.begin() + std::min(pages, p + 16));
      std::vector<uint64_t> sums;
      if (ucx) {
        // One-sided reads straight into a registered buffer, as a decode worker fetches into
        // its reserve; the client verifies every record.
        std::vector<uint64_t> offsets;
        for (size_t i = 0; i < b.size(); ++i) offsets.push_back(i * record_bytes);
        std::vector<fm::PageHeaderData> headers;
        FM_RETURN_IF_ERROR(c.ReadUcx(b, *landing, offsets, &headers));
        for (const auto& h : headers) sums.push_back(h.checksum);
      } else {
        FM_ASSIGN_OR_RETURN(auto recs, c.Get(b));
        for (const auto& r : recs) sums.push_back(r.header.checksum);
      }
      for (size_t i = 0; i < b.size(); ++i)
        if (sums[i] != checksums[b[i].page])
          return absl::DataLossError(
              absl::StrFormat("page %d differs from what was written", b[i].page));
      Bar(label, std::min(pages, p + 16) - first, pages - first, t);
    }
    *secs = std::chrono::duration<double>(Clock::now() - t).count();
    return absl::OkStatus();
  };
  double ucx_s = 0, grpc_s = 0, hot_ucx_s = 0, hot_grpc_s = 0;
  if (c.has_ucx()) {
    if (absl::Status s = read_all(true, "read back over UCX", 0, &ucx_s); !s.ok()) return Fail(s);
  }
  if (absl::Status s = read_all(false, "read back over gRPC", 0, &grpc_s); !s.ok()) return Fail(s);
  // The newest pages (a decode cycle's tail and recent context) now sit in the RAM tier.
  uint64_t hot = std::min<uint64_t>(pages, 64);
  for (int pass = 0; pass < 2; ++pass) {  // the first pass warms, the second is timed
    if (c.has_ucx()) {
      if (absl::Status s = read_all(true, "re-read newest pages, UCX", pages - hot, &hot_ucx_s);
          !s.ok())
        return Fail(s);
    }
    if (absl::Status s = read_all(false, "re-read newest pages, gRPC", pages - hot, &hot_grpc_s);
        !s.ok())
      return Fail(s);
  }

  auto st = c.Stats(session);
  if (!st.ok()) return Fail(st.status());
  double mib = pages * spec->PageBytes() / 1048576.0;
  std::printf("\n  %-32s %10s\n", "step", "MiB/s");
  std::printf("  %-32s %10.0f\n", "prefill: put every page (WAL)", mib / put_s);
  if (c.has_ucx()) std::printf("  %-32s %10.0f\n", "all pages over UCX (spilled)", mib / ucx_s);
  std::printf("  %-32s %10.0f\n", "all pages over gRPC (spilled)", mib / grpc_s);
  double hot_mib = hot * spec->PageBytes() / 1048576.0;
  if (c.has_ucx())
    std::printf("  %-32s %10.0f\n", "newest pages from RAM, UCX", hot_mib / hot_ucx_s);
  std::printf("  %-32s %10.0f\n", "newest pages from RAM, gRPC", hot_mib / hot_grpc_s);
  std::printf("\n  tiers: RAM %.1f / %.1f MiB (%llu pages), RocksDB %.1f MiB (%llu pages)\n",
              st->ram().bytes() / 1048576.0, st->ram().capacity_bytes() / 1048576.0,
              static_cast<unsigned long long>(st->ram().pages()), st->rocksdb().bytes() / 1048576.0,
              static_cast<unsigned long long>(st->rocksdb().pages()));
  const auto& ss = st->sessions(0);
  std::printf(
      "  session: %llu pages, RAM hits %llu, misses %llu; store-wide evictions %llu, spill reads "
      "%llu\n",
      static_cast<unsigned long long>(ss.pages()), static_cast<unsigned long long>(ss.hits()),
      static_cast<unsigned long long>(ss.misses()),
      static_cast<unsigned long long>(st->evictions()),
      static_cast<unsigned long long>(st->spill_reads()));
  std::printf("  every page read back bit-exact over %s\n", c.has_ucx() ? "both paths" : "gRPC");
  auto n = c.DeleteSession(session);
  if (!n.ok()) return Fail(n.status());
  std::printf("  deleted the session (%llu pages)\n", static_cast<unsigned long long>(*n));
  return 0;
}

int Stats(const std::string& target, const std::string& session) {
  fm::KvClientOptions co;
  co.use_ucx = false;
  co.security = g_security;
  auto client = fm::KvClient::Connect(target, co);
  if (!client.ok()) return Fail(client.status());
  auto st = (*client)->Stats(session.empty() ? "*" : session);
  if (!st.ok()) return Fail(st.status());
  std::printf("%s", st->DebugString().c_str());
  return 0;
}

// Generates sessions (seeds seed, seed + 1, ...) and writes one trace per session.
int Gen(const std::string& spec_name, uint64_t tokens, uint32_t steps, uint64_t seed, int count,
        const std::string& out_dir, const fm::workload::TraceOptions& topt,
        const fm::workload::Knobs& knobs) {
  auto spec = fm::PresetSpec(spec_name);
  if (!spec.ok()) return Fail(spec.status());
  for (int i = 0; i < count; ++i) {
    fm::workload::SessionConfig c;
    c.spec = *spec;
    c.knobs = knobs;
    c.seed = seed + i;
    c.prefill_tokens = tokens;
    c.steps = steps;
    const auto t0 = std::chrono::steady_clock::now();
    auto s = fm::workload::Session::Generate(c);
    if (!s.ok()) return Fail(s.status());
    const std::string path = out_dir + "/" + spec_name + "-" + std::to_string(tokens) + "-s" +
                             std::to_string(c.seed) + ".safetensors";
    if (absl::Status st = fm::workload::WriteTrace(**s, path, topt); !st.ok()) return Fail(st);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[%d/%d] %s: %llu tokens + %u steps, %llu chunks, %zu needles, %.1f s\n", i + 1,
                count, path.c_str(), static_cast<unsigned long long>(tokens), steps,
                static_cast<unsigned long long>((*s)->total_chunks()), (*s)->needles().size(), sec);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fmctl: FlashMemory command-line client"};
  app.require_subcommand(1);
  app.fallthrough();  // the TLS and token flags go before or after the subcommand
  fm::AddTlsFlags(app, &g_security.tls);
  app.add_option("--token", g_security.token, "Bearer token (a tenant's, or a service's)");
  std::string target = "127.0.0.1:50051", spec = "bench", session = "demo";
  uint64_t tokens = 32768;
  fm::fmctl::DecodeDemoOptions dd;
  auto* ddemo = app.add_subcommand(
      "demo", "Decode a generated long session in dense and in sparse mode, side by side");
  ddemo->add_option("--target", dd.target, "Decode worker or all-in-one address")
      ->capture_default_str();
  ddemo->add_option("--spec", dd.spec, "Model spec preset: tiny, bench, long")
      ->capture_default_str();
  ddemo->add_option("--tokens", dd.tokens, "Prefill tokens")->capture_default_str();
  ddemo->add_option("--steps", dd.steps,
                    absl::StrFormat("Decode steps (whole cycles of %u)", fm::workload::Knobs{}.tau))
      ->capture_default_str();
  ddemo->add_option("--budget", dd.budget,
                    "Sparse footprint cap: the most of a session's pages it holds")
      ->capture_default_str();
  ddemo->add_option("--seed", dd.seed, "Session seed")->capture_default_str();
  ddemo->add_option("--session", dd.session, "Session id prefix")->capture_default_str();
  ddemo->add_flag("--whole_step", dd.whole_step,
                  "Send whole steps (replay) instead of one request per layer");
  auto* demo = app.add_subcommand(
      "kv-demo", "Store a generated long session and read it back over UCX and gRPC");
  demo->add_option("--target", target, "Server address")->capture_default_str();
  demo->add_option("--spec", spec, "Model spec preset: tiny, bench, long")->capture_default_str();
  demo->add_option("--tokens", tokens, "Session length in tokens")->capture_default_str();
  demo->add_option("--session", session, "Session id")->capture_default_str();
  auto* stats = app.add_subcommand("stats", "Print store statistics");
  stats->add_option("--target", target, "Server address")->capture_default_str();
  stats->add_option("--session", session, "Session id (default: all)");
  auto* del = app.add_subcommand("delete", "Delete a session's pages");
  del->add_option("--target", target, "Server address")->capture_default_str();
  del->add_option("--session", session, "Session id")->required();
  auto* lw = app.add_subcommand("load-weights",
                                "Load indexer weights (lsa) on every indexer replica");
  std::string weights;
  lw->add_option("--target", target, "Indexer replicas or the all-in-one (h:p,h:p)")
      ->capture_default_str();
  lw->add_option("file", weights, "Weights file (safetensors) the indexer can read")->required();
  auto* gen = app.add_subcommand("gen", "Generate workload sessions and write them as traces");
  uint32_t steps = 256;
  uint64_t seed = 1;
  int count = 1;
  std::string out_dir = ".";
  fm::workload::TraceOptions topt;
  fm::workload::Knobs knobs;
  gen->add_option("--spec", spec, "Model spec preset: tiny, bench, long")->capture_default_str();
  gen->add_option("--tokens", tokens, "Prefill tokens per session")->capture_default_str();
  gen->add_option("--steps", steps, "Decode steps (whole cycles of --tau)")->capture_default_str();
  gen->add_option("--seed", seed, "Seed of the first session")->capture_default_str();
  gen->add_option("--count", count, "Sessions (seeds seed, seed + 1, ...)")->capture_default_str();
  gen->add_option("--out", out_dir, "Output directory")->capture_default_str();
  gen->add_flag("--pages", topt.pages, "Also write the K/V pages");
  gen->add_flag("--step-queries", topt.step_queries, "Also write the decode queries of every step");
  gen->add_flag("--outputs", topt.outputs,
                "Also write the dense attention outputs of every step (a pass over the history "
                "per step and head: small sessions)");
  gen->add_option("--world-seed", knobs.world_seed, "Seed of the synthetic model")
      ->capture_default_str();
  gen->add_option("--tau", knobs.tau, "Decode steps per cycle")->capture_default_str();
  gen->add_option("--topics", knobs.session_topics, "Topics per session")->capture_default_str();
  gen->add_option("--episode-tokens", knobs.episode_tokens, "Mean history episode length")
      ->capture_default_str();
  gen->add_option("--focus-steps", knobs.focus_steps, "Mean decode steps per focus")
      ->capture_default_str();
  gen->add_option("--recent-focus", knobs.recent_focus, "P(focus on the newest topic)")
      ->capture_default_str();
  gen->add_option("--anticipate", knobs.anticipate, "P(hidden state announces a switch)")
      ->capture_default_str();
  gen->add_option("--needles", knobs.needles, "Needles per session")->capture_default_str();
  gen->add_option("--drift", knobs.drift, "Topic drift over the history")->capture_default_str();
  gen->add_option("--sink-share", knobs.sink_share, "Attention share of the sink")
      ->capture_default_str();
  gen->add_option("--diffuse-heads", knobs.diffuse_heads, "Fraction of diffuse heads")
      ->capture_default_str();
  gen->add_option("--top-p", knobs.top_p, "Label: top-p attention mass")->capture_default_str();
  gen->add_option("--label-layers", knobs.label_layers, "Label: in at least m layers")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (gen->parsed()) return Gen(spec, tokens, steps, seed, count, out_dir, topt, knobs);
  dd.security = g_security;
  if (ddemo->parsed()) return fm::fmctl::DecodeDemo(dd);
  if (demo->parsed()) return Demo(target, spec, tokens, session);
  if (stats->parsed()) return Stats(target, stats->count("--session") ? session : "");
  if (lw->parsed()) {
    auto client = fm::indexer::IndexerClient::Connect(target, 10000, g_security);
    if (!client.ok()) return Fail(client.status());
    auto hash = (*client)->LoadWeights(weights);
    if (!hash.ok()) return Fail(hash.status());
    std::printf("loaded %s on %zu indexer replica(s): weights hash %016llx\n", weights.c_str(),
                (*client)->replicas().size(), static_cast<unsigned long long>(*hash));
    return 0;
  }
  if (del->parsed()) {
    fm::KvClientOptions co;
    co.use_ucx = false;
    co.security = g_security;
    auto client = fm::KvClient::Connect(target, co);
    if (!client.ok()) return Fail(client.status());
    auto n = (*client)->DeleteSession(session);
    if (!n.ok()) return Fail(n.status());
    std::printf("deleted %llu pages\n", static_cast<unsigned long long>(*n));
    return 0;
  }
  return 2;
}
