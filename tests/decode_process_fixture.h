// The fixture of the decode worker's process tests (decode_integration_test.cc,
// decode_faults_test.cc): a generated tiny-spec session, and helpers that start the real
// binaries on loopback and drive them with the replay client.
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <atomic>
#include <filesystem>
#include <thread>

#include "common/spec_proto.h"
#include "common/status_matchers.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"
#include "tools/replay/replay.h"

namespace fm::decode {
namespace {
namespace v1 = flashmemory::v1;
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;
using Code = absl::StatusCode;
using ::testing::HasSubstr;

inline double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

class DecodeProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("fm_decit");
    workload::SessionConfig c;
    c.spec = *PresetSpec("tiny");
    c.knobs.tau = 16;
    c.seed = 21;
    c.prefill_tokens = 4000;  // a partial last page
    c.steps = 64;
    g_ = *workload::Session::Generate(c);
    prefill_ = replay::MakePrefill(*g_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<ServerProcess> Start(const std::string& bin, std::vector<std::string> args) {
    // The tests' step numbers assume a set switch 4 steps after each cycle start.
    if (bin == "flashmemory" || bin == "fm-decode") args.insert(args.end(), {"--switch_lag", "4"});
    auto p = ServerProcess::Start(bin, std::move(args));
    EXPECT_THAT(p, IsOk());
    return p.ok() ? std::move(*p) : nullptr;
  }
  std::unique_ptr<ServerProcess> AllInOne(const std::string& name) {
    return Start("flashmemory", {"--data_dir", dir_ + "/" + name, "--ram_bytes", "64MiB",
                                 "--reserve_bytes", "64MiB"});
  }
  absl::StatusOr<replay::ReplayResult> Run(const std::string& target, const std::string& id,
                                           Mode mode, float budget, indexer::Policy policy,
                                           bool whole_step = false) {
    auto client = DecodeClient::Connect(target, 30000);
    if (!client.ok()) return client.status();
    replay::ReplayOptions o;
    o.session_id = id;
    o.mode = mode;
    o.budget = budget;
    o.policy = policy;
    o.whole_step = whole_step;
    return replay::Replay(**client, *g_, prefill_, o);
  }

  // Opens `id` (sparse, quest at 25 %) on a worker and prefills the generated history.
  absl::Status OpenQuest(DecodeClient& client, const std::string& id) {
    replay::ReplayOptions o;
    o.session_id = id;
    o.budget = 0.25f;
    o.policy = indexer::Policy::kQuest;
    replay::ReplayResult unused;
    return replay::OpenAndPrefill(client, *g_, prefill_, o, &unused);
  }

  // A kvstore, an indexer and two decode workers (a, b) that share them.
  // The undisturbed run of session "r" (quest at 25 %) on an all-in-one that is stopped
  // afterwards: the outputs the fault tests compare theirs with.
  absl::StatusOr<replay::ReplayResult> UndisturbedQuestRun(bool whole_step = false) {
    auto one = AllInOne("one");
    if (!one) return absl::InternalError("the reference all-in-one did not start");
    auto ref = Run(one->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest, whole_step);
    one->Stop(SIGTERM);
    return ref;
  }

  struct TwoWorkers {
    std::unique_ptr<ServerProcess> kv, ix, a, b;
  };
  TwoWorkers StartTwoWorkers() {
    TwoWorkers c;
    c.kv = Start("fm-kvstore",
                 {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
    c.ix = Start("fm-indexer", {});
    if (!c.kv || !c.ix) return c;
    const std::vector<std::string> args = {"--kvstore",  c.kv->target(),    "--indexer",
                                           c.ix->target(), "--reserve_bytes", "64MiB"};
    c.a = Start("fm-decode", args);
    c.b = Start("fm-decode", args);
    return c;
  }

  // Runs whole steps [from, to) of `src`'s session on a stream, their outputs into
  // out[step][layer][q_heads * head_dim]; the code of the first that fails (0: none).
  int WholeSteps(DecodeClient::Stream& stream, replay::StepSource& src, uint32_t from,
                 uint32_t to, std::vector<float>* out) {
    const ModelSpec& sp = g_->spec();
    const size_t qs = size_t{sp.q_heads} * sp.head_dim;
    for (uint32_t st = from; st < to; ++st) {
      flashmemory::v1::DecodeBatch batch;
      *batch.add_requests() = src.Request(st, 0, sp.layers);
      auto r = stream.Run(batch);
      if (!r.ok()) return int(r.status().code());
      if (r->results(0).code() != 0) return r->results(0).code();
      std::memcpy(out->data() + size_t{st} * sp.layers * qs, r->results(0).out().data(),
                  sp.layers * qs * 4);
    }
    return 0;
  }

  void RestartKvstoreMidSession(bool ucx, int sig, bool restart_at_once);

  std::string dir_;
  std::unique_ptr<workload::Session> g_;
  replay::PrefillData prefill_;
};

}  // namespace
}  // namespace fm::decode
