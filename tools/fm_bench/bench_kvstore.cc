// fm-bench kvstore: starts a real fm-kvstore process and measures page reads over UCX, over
// the gRPC byte path and from RocksDB spill, against a plain memcpy and a plain RocksDB Get
// loop of the same bytes measured in the same run.
#include <rocksdb/db.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <random>

#include "absl/strings/str_cat.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"
#include "tools/fm_bench/bench.h"

namespace fm::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Best throughput (GB/s, 1e9 bytes) of `rounds` runs of fn, each moving `bytes`.
double BestGbps(int rounds, uint64_t bytes, const std::function<bool()>& fn) {
  double best = 0;
  for (int r = 0; r < rounds; ++r) {
    auto t0 = Clock::now();
    if (!fn()) return -1;
    double s = Seconds(t0, Clock::now());
    best = std::max(best, bytes / s / 1e9);
  }
  return best;
}

void Progress(const char* what) { std::fprintf(stderr, "fm-bench kvstore: %s\n", what); }

}  // namespace

int RunKvStoreBench(const KvBenchOptions& o) {
  const uint64_t record = o.page_bytes + kPageHeaderBytes;
  const uint64_t total = static_cast<uint64_t>(o.pages) * o.page_bytes;
  std::string dir = MakeTempDir("fm_bench_kv");
  // RAM tier sized to hold the hot set; a second, small one forces every read to spill.
  uint64_t slab = std::max<uint64_t>(64ull << 20, record + 4096);
  uint64_t ram = (static_cast<uint64_t>(o.pages) + 8) * ((record + 4095) / 4096 * 4096) + 2 * slab;
  auto hot = ServerProcess::Start(
      "fm-kvstore",
      {"--db", dir + "/hot", "--ram_bytes", std::to_string(ram), "--slab_bytes",
       std::to_string(slab), "--max_message_bytes", std::to_string(2 * record + (1 << 20))});
  // The cold store's RAM holds a handful of pages, so a pass over all pages misses on each.
  uint64_t cold_ram = 3 * static_cast<uint64_t>(o.batch) * ((record + 4095) / 4096 * 4096);
  auto cold = ServerProcess::Start(
      "fm-kvstore",
      {"--db", dir + "/cold", "--ram_bytes", std::to_string(cold_ram), "--slab_bytes",
       std::to_string(cold_ram), "--max_message_bytes", std::to_string(2 * record + (1 << 20)),
       // The bench is the store's only client and holds two batches (resolving the next
       // while reading one): 2/3 of this small tier, above the default share of half.
       "--max_pinned_bytes_per_client", std::to_string(cold_ram)});
  if (!hot.ok() || !cold.ok()) {
    std::fprintf(stderr, "cannot start fm-kvstore: %s %s\n", hot.status().ToString().c_str(),
                 cold.status().ToString().c_str());
    return 1;
  }
  KvClientOptions co;
  co.max_message_bytes = 2 * record + (1 << 20);
  co.staging_bytes = 1 << 20;
  auto hot_client = KvClient::Connect((*hot)->target(), co);
  auto cold_client = KvClient::Connect((*cold)->target(), co);
  if (!hot_client.ok() || !cold_client.ok() || !(*hot_client)->has_ucx()) {
    std::fprintf(stderr, "cannot connect: %s\n", hot_client.status().ToString().c_str());
    return 1;
  }
  KvClient* hc = hot_client->get();
  KvClient* cc = cold_client->get();

  Progress(absl::StrCat("storing ", o.pages, " pages of ", o.page_bytes, " bytes in each store")
               .c_str());
  std::vector<std::string> payloads;
  for (int i = 0; i < o.pages; ++i) payloads.push_back(RandomBytes(o.page_bytes, i));
  std::vector<PageRef> keys;
  for (int i = 0; i < o.pages; ++i) {
    auto h = MakePageHeader("bench", i, 1, 64, DType::kBf16, payloads[i].data(), o.page_bytes);
    absl::Status s = hc->Put(h, payloads[i].data());
    if (s.ok()) s = cc->Put(h, payloads[i].data());
    if (!s.ok()) {
      std::fprintf(stderr, "put: %s\n", s.ToString().c_str());
      return 1;
    }
    keys.push_back({"bench", static_cast<uint64_t>(i)});
  }

  // Destination: one registered buffer for a batch of records.
  UcxEngine* engine = hc->engine();
  auto dst = engine->MapRegion(static_cast<uint64_t>(o.batch) * record);
  if (!dst.ok()) return 1;
  std::vector<uint64_t> offsets(o.batch);
  for (int i = 0; i < o.batch; ++i) offsets[i] = static_cast<uint64_t>(i) * record;

  // Reads every page in batches, resolving batch k+1 while batch k is read (as a decode
  // worker prefetches ahead of need).
  auto ucx_pass = [&](KvClient* c) {
    auto batch_keys = [&](int i) {
      return std::vector<PageRef>(keys.begin() + i, keys.begin() + std::min(o.pages, i + o.batch));
    };
    auto next = std::async(std::launch::async, [&, k = batch_keys(0)] { return c->Resolve(k); });
    for (int i = 0; i < o.pages; i += o.batch) {
      absl::StatusOr<KvClient::Resolved> cur = next.get();
      if (i + o.batch < o.pages)
        next = std::async(std::launch::async,
                          [&, k = batch_keys(i + o.batch)] { return c->Resolve(k); });
      absl::Status s = cur.status();
      if (s.ok()) {
        std::vector<uint64_t> off(offsets.begin(), offsets.begin() + cur->keys.size());
        s = c->ReadResolved(*cur, **dst, off, nullptr);
      }
      if (!s.ok()) {
        if (next.valid()) next.wait();
        std::fprintf(stderr, "ucx read: %s\n", s.ToString().c_str());
        return false;
      }
    }
    return true;
  };
  Progress("UCX get (RAM tier)");
  ucx_pass(hc);  // warm: every page resident
  double ucx = BestGbps(o.rounds, total, [&] { return ucx_pass(hc); });

  Progress("gRPC byte path get (RAM tier)");
  auto grpc_pass = [&] {
    for (int i = 0; i < o.pages; i += o.batch) {
      int n = std::min(o.batch, o.pages - i);
      auto r = hc->Get(std::vector<PageRef>(keys.begin() + i, keys.begin() + i + n));
      if (!r.ok()) {
        std::fprintf(stderr, "grpc get: %s\n", r.status().ToString().c_str());
        return false;
      }
    }
    return true;
  };
  double grpc = BestGbps(o.rounds, total, grpc_pass);

  Progress("UCX get from RocksDB spill (RAM tier far smaller than the data)");
  auto before = cc->Stats().value();
  double spill = BestGbps(o.rounds, total, [&] { return ucx_pass(cc); });
  auto after = cc->Stats().value();
  uint64_t spill_reads = after.spill_reads() - before.spill_reads();
  uint64_t reads = (after.hits() + after.misses()) - (before.hits() + before.misses());

  Progress("anchor: memcpy of the same bytes");
  std::vector<char> sink(static_cast<uint64_t>(o.batch) * o.page_bytes);
  double memcpy_gbps = BestGbps(o.rounds, total, [&] {
    for (int i = 0; i < o.pages; ++i)
      std::memcpy(sink.data() + (i % o.batch) * o.page_bytes, payloads[i].data(), o.page_bytes);
    return sink[0] != 1 || true;
  });

  Progress("anchor: plain RocksDB Get loop of the same values");
  double rocks = -1;
  {
    rocksdb::Options opts;
    opts.create_if_missing = true;
    rocksdb::DB* raw = nullptr;
    if (!rocksdb::DB::Open(opts, dir + "/plain", &raw).ok()) return 1;
    std::unique_ptr<rocksdb::DB> db(raw);
    for (int i = 0; i < o.pages; ++i)
      if (!db->Put(rocksdb::WriteOptions(), std::to_string(i), payloads[i]).ok()) return 1;
    rocksdb::PinnableSlice v;
    rocks = BestGbps(o.rounds, total, [&] {
      for (int i = 0; i < o.pages; ++i) {
        v.Reset();
        if (!db->Get(rocksdb::ReadOptions(), db->DefaultColumnFamily(), std::to_string(i), &v).ok())
          return false;
        std::memcpy(sink.data() + (i % o.batch) * o.page_bytes, v.data(),
                    v.size());  // land it, as the store does
      }
      return true;
    });
    if (!db->Close().ok()) return 1;
  }

  std::printf("\nfm-bench kvstore: %d pages x %llu bytes per pass, best of %d, batch %d\n", o.pages,
              static_cast<unsigned long long>(o.page_bytes), o.rounds, o.batch);
  std::printf("%-34s %10s %s\n", "path", "GB/s", "ratio");
  std::printf("%-34s %10.2f %.2fx gRPC, %.0f%% of memcpy\n", "UCX get (RAM tier)", ucx, ucx / grpc,
              100 * ucx / memcpy_gbps);
  std::printf("%-34s %10.2f\n", "gRPC byte path get (RAM tier)", grpc);
  std::printf("%-34s %10.2f %.0f%% of plain RocksDB (%llu of %llu reads spilled)\n",
              "UCX get from RocksDB spill", spill, 100 * spill / rocks,
              static_cast<unsigned long long>(spill_reads), static_cast<unsigned long long>(reads));
  std::printf("%-34s %10.2f\n", "anchor: memcpy", memcpy_gbps);
  std::printf("%-34s %10.2f\n", "anchor: plain RocksDB Get loop", rocks);
  std::printf("targets: UCX >= 3x gRPC [%s], UCX >= 50%% memcpy [%s], spill >= 50%% RocksDB [%s]\n",
              ucx >= 3 * grpc ? "met" : "MISSED", ucx >= 0.5 * memcpy_gbps ? "met" : "MISSED",
              spill >= 0.5 * rocks ? "met" : "MISSED");
  if (!o.json.empty()) {
    WriteJsonObject(o.json, {{"ucx_get_gbps", ucx},
                             {"grpc_get_gbps", grpc},
                             {"spill_get_gbps", spill},
                             {"memcpy_gbps", memcpy_gbps},
                             {"rocksdb_get_gbps", rocks},
                             {"ucx_over_grpc", ucx / grpc},
                             {"ucx_over_memcpy", ucx / memcpy_gbps},
                             {"spill_over_rocksdb", spill / rocks}});
  }
  dst->reset();  // unmap before the engine that registered it goes
  hot_client->reset();
  cold_client->reset();
  (*hot)->Stop(SIGTERM);
  (*cold)->Stop(SIGTERM);
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace fm::bench
