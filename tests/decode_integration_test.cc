// Integration tests of the decode worker: real flashmemory, fm-decode, fm-kvstore and
// fm-indexer processes on loopback, driven by the replay client.
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

double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
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

  void RestartKvstoreMidSession(bool ucx, int sig, bool restart_at_once);

  std::string dir_;
  std::unique_ptr<workload::Session> g_;
  replay::PrefillData prefill_;
};

TEST_F(DecodeProcessTest, AllInOneDenseMatchesTheModelAndSparseWithEveryPageMatchesDense) {
  auto server = AllInOne("one");
  ASSERT_NE(server, nullptr);
  auto dense = Run(server->target(), "dense", Mode::kDense, 1.0f, indexer::Policy::kDefault);
  ASSERT_THAT(dense, IsOk());
  // Whole-step replay of the sparse session: every layer in one request.
  auto all = Run(server->target(), "all", Mode::kSparse, 1.0f, indexer::Policy::kDense, true);
  ASSERT_THAT(all, IsOk());
  EXPECT_LT(MaxDiff(dense->out, all->out), 1e-5);
  const replay::Fidelity f = replay::Compare(g_->spec(), *all, *dense);
  EXPECT_GT(f.cosine_min, 0.99999);
  EXPECT_GT(f.mass_recall, 0.99999);
  // Dense outputs equal the model's exact attention.
  const ModelSpec& sp = g_->spec();
  EXPECT_LT(replay::CompareToModel(*g_, 64, 7,
                                   [&](uint32_t st, uint32_t l) {
                                     return dense->out.data() +
                                            (size_t{st} * sp.layers + l) * sp.q_heads * sp.head_dim;
                                   })
                .max_abs,
            1e-4);
  EXPECT_EQ(dense->stats.tokens(), 4064u);
  EXPECT_EQ(dense->stats.stalls(), 0u);
  // Dense holds every page: every needle's page is resident at its retrieval step.
  EXPECT_GT(dense->needles, 0u);
  EXPECT_EQ(dense->needle_hits, dense->needles);
  EXPECT_TRUE(dense->needle_recovery_steps.empty());
  EXPECT_EQ(all->stats.predictions(), 4u);
  EXPECT_EQ(all->stats.prediction_failures(), 0u);
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

TEST_F(DecodeProcessTest, ThreeProcessesWithTwoKvstoreReplicasMatchTheAllInOne) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto ref = Run(one->target(), "q", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());
  auto dense = Run(one->target(), "d", Mode::kDense, 1.0f, indexer::Policy::kDefault);
  ASSERT_THAT(dense, IsOk());

  auto kv_a =
      Start("fm-kvstore", {"--db", dir_ + "/a", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto kv_b =
      Start("fm-kvstore", {"--db", dir_ + "/b", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv_a && kv_b && ix);
  auto dec = Start("fm-decode", {"--kvstore", kv_a->target() + "," + kv_b->target(), "--indexer",
                                 ix->target(), "--reserve_bytes", "64MiB", "--metrics_port", "0"});
  ASSERT_NE(dec, nullptr);
  auto got = Run(dec->target(), "q", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(got, IsOk());
  // Each needle missed at its retrieval step has one recovery entry: the steps until its page
  // was resident (1 to the watch) or -1; the same on both clusters (the same sets).
  EXPECT_LT(ref->needle_hits, ref->needles);  // quest at 25 % misses some of this session's
  EXPECT_EQ(ref->needle_recovery_steps.size(), ref->needles - ref->needle_hits);
  for (int v : ref->needle_recovery_steps)
    EXPECT_TRUE(v == -1 || (v >= 1 && v <= static_cast<int>(replay::kNeedleWatchSteps))) << v;
  EXPECT_EQ(got->needle_recovery_steps, ref->needle_recovery_steps);
  EXPECT_EQ(got->needle_hits, ref->needle_hits);
  {  // The reserve is mapped for UCX: fetched pages landed in their cells in place.
    httplib::Client http("127.0.0.1", dec->metrics_port());
    auto res = http.Get("/metrics");
    ASSERT_TRUE(res && res->status == 200);
    const std::string key = "\nfm_decode_pages_read_in_place_total ";
    const size_t at = res->body.find(key);
    ASSERT_NE(at, std::string::npos) << res->body;
    EXPECT_GE(std::stod(res->body.substr(at + key.size())), double(got->stats.pages_fetched()));
    const std::string steps = "\nfm_decode_steps_total ";  // the worker's totals
    const size_t st = res->body.find(steps);
    ASSERT_NE(st, std::string::npos) << res->body;
    EXPECT_EQ(std::stod(res->body.substr(st + steps.size())), double(got->stats.steps()));
  }
  // The same session, options and deterministic cycle switches: the same outputs.
  EXPECT_LT(MaxDiff(got->out, ref->out), 1e-6);
  EXPECT_EQ(got->stats.pages_fetched(), ref->stats.pages_fetched());
  EXPECT_GT(got->stats.pages_fetched(), 0u);
  EXPECT_LT(got->stats.footprint(), 0.45);
  const replay::Fidelity f = replay::Compare(g_->spec(), *got, *dense);
  EXPECT_GT(f.mass_recall, 0.8);
  EXPECT_GT(f.cosine_mean, 0.95);
  // Pages are spread over both replicas.
  KvClientOptions ko;
  ko.use_ucx = false;
  for (auto* kv : {kv_a.get(), kv_b.get()}) {
    auto c = KvClient::Connect(kv->target(), ko);
    ASSERT_THAT(c, IsOk());
    auto st = (*c)->Stats("q");
    ASSERT_THAT(st, IsOk());
    EXPECT_GT(st->sessions(0).pages(), 10u);
  }
}

// The kvstore goes down at step 21 of a quest session (SIGKILL, or SIGTERM) and comes back
// on its port, at once or only after a step failed against it; over UCX or gRPC only. The
// worker must stay up, fail only the steps that need the store while it is down, and go on
// with the undisturbed run's outputs (over UCX: a new endpoint and remote key to the new
// instance, never a read of the old one's arena).
void DecodeProcessTest::RestartKvstoreMidSession(bool ucx, int sig, bool restart_at_once) {
  auto ref_server = AllInOne("one");
  ASSERT_NE(ref_server, nullptr);
  auto ref = Run(ref_server->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());

  std::vector<std::string> kv_args = {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes",
                                      "4MiB"};
  if (!ucx) kv_args.push_back("--no_ucx");
  auto kv = Start("fm-kvstore", kv_args);
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::string kv_port = std::to_string(kv->port());
  std::vector<std::string> dec_args = {"--kvstore", kv->target(), "--indexer", ix->target(),
                                       "--reserve_bytes", "64MiB"};
  if (!ucx) dec_args.push_back("--no_ucx");
  auto dec = Start("fm-decode", dec_args);
  ASSERT_NE(dec, nullptr);
  auto client = DecodeClient::Connect(dec->target(), 5000).value();
  ASSERT_THAT(OpenQuest(*client, "r"), IsOk());
  replay::StepSource src(*g_, "r", 16);
  auto stream = client->OpenStream();
  const ModelSpec& sp = g_->spec();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  std::vector<float> out(ref->out.size());
  // Runs one step; the code of its first failing layer.
  auto step = [&](uint32_t st) -> int {
    for (uint32_t l = 0; l < sp.layers; ++l) {
      v1::DecodeBatch b;
      *b.add_requests() = src.Request(st, l, 1);
      auto r = stream->Run(b);
      if (!r.ok()) return int(Code::kInternal);
      const v1::LayerResult& lr = r->results(0);
      if (lr.code() != 0) return lr.code();
      std::memcpy(out.data() + (size_t{st} * sp.layers + l) * qs, lr.out().data(), qs * 4);
    }
    return 0;
  };
  uint32_t failed_at = 0;
  for (uint32_t st = 0; st < 64; ++st) {
    // Down from step 21: after the cycle of step 16 switched (step 20, switch lag 4) and its
    // catch-up fetch is done, so that only the sealing step meets the dead store.
    if (st == 21) {
      for (int tries = 0; tries < 200; ++tries) {
        auto s = client->Stats("r");
        ASSERT_THAT(s, IsOk());
        if (!s->fetching()) break;
        usleep(50000);
      }
      const int status = kv->Stop(sig);
      if (sig == SIGKILL) {
        ASSERT_TRUE(WIFSIGNALED(status));
      } else {
        ASSERT_EQ(status, 0);  // a clean shutdown
      }
      kv.reset();
      if (restart_at_once) {
        std::vector<std::string> args = kv_args;
        args.insert(args.end(), {"--port", kv_port});
        kv = Start("fm-kvstore", args);
        ASSERT_NE(kv, nullptr);
      }
    }
    int code = step(st);
    if (code == int(Code::kUnavailable) && restart_at_once) {
      for (int tries = 0; tries < 100 && code != 0; ++tries) {  // the channel reconnects
        usleep(100000);
        code = step(st);
      }
    } else if (code == int(Code::kUnavailable)) {
      // The page this step seals cannot be stored: the step fails whole, the session stays
      // at it, and it fails the same way while the store is down.
      failed_at = st;
      EXPECT_EQ(step(st), int(Code::kUnavailable));
      auto stats = client->Stats("r");
      ASSERT_THAT(stats, IsOk());
      EXPECT_EQ(stats->steps(), st);
      std::vector<std::string> args = kv_args;
      args.insert(args.end(), {"--port", kv_port});
      kv = Start("fm-kvstore", args);
      ASSERT_NE(kv, nullptr);
      for (int tries = 0; tries < 100 && code != 0; ++tries) {  // the channel reconnects
        code = step(st);
        if (code != 0) usleep(100000);
      }
    }
    ASSERT_EQ(code, 0) << "step " << st;
  }
  if (!restart_at_once) {
    EXPECT_EQ(failed_at, 31u);  // step 31 seals page 62 (tokens 3968..4031)
  }
  auto stats = client->Stats("r");
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->steps(), 64u);
  EXPECT_EQ(stats->tokens(), 4064u);
  EXPECT_EQ(stats->prediction_failures(), 0u);
  // Nothing was lost or corrupted: the outputs equal the undisturbed run's.
  EXPECT_LT(MaxDiff(out, ref->out), 1e-6);
  EXPECT_THAT(stream->Finish(), IsOk());
  EXPECT_TRUE(dec->Alive());
  EXPECT_EQ(dec->Stop(SIGTERM), 0);
}

TEST_F(DecodeProcessTest, KvstoreKilledAndRestartedMidSession) {
  RestartKvstoreMidSession(/*ucx=*/false, SIGKILL, /*restart_at_once=*/false);
}

TEST_F(DecodeProcessTest, KvstoreKilledAndRestartedMidSessionOverUcx) {
  RestartKvstoreMidSession(/*ucx=*/true, SIGKILL, /*restart_at_once=*/false);
}

TEST_F(DecodeProcessTest, KvstoreRestartedCleanlyWhileTheWorkerIsIdleOverUcx) {
  RestartKvstoreMidSession(/*ucx=*/true, SIGTERM, /*restart_at_once=*/true);
}

TEST_F(DecodeProcessTest, KvstoreKilledAndRestartedAtOnceOverUcx) {
  RestartKvstoreMidSession(/*ucx=*/true, SIGKILL, /*restart_at_once=*/true);
}


TEST_F(DecodeProcessTest, IndexerUnreachableMidSession) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto dense = Run(one->target(), "d", Mode::kDense, 1.0f, indexer::Policy::kDefault);
  ASSERT_THAT(dense, IsOk());
  auto kv =
      Start("fm-kvstore", {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  auto dec = Start("fm-decode", {"--kvstore", kv->target(), "--indexer", ix->target(),
                                 "--reserve_bytes", "64MiB", "--indexer_deadline_ms", "300"});
  ASSERT_NE(dec, nullptr);
  auto client = DecodeClient::Connect(dec->target(), 10000).value();
  const ModelSpec& sp = g_->spec();
  ASSERT_THAT(OpenQuest(*client, "x"), IsOk());
  replay::StepSource src(*g_, "x", 16);
  auto stream = client->OpenStream();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  replay::ReplayResult got;
  got.out.resize(dense->out.size());
  got.lse.resize(dense->lse.size());
  for (uint32_t st = 0; st < 64; ++st) {
    // Unreachable (stopped) from step 21 to step 40: the prediction of step 32 times out.
    if (st == 21) {
      ASSERT_EQ(kill(ix->pid(), SIGSTOP), 0);
    }
    if (st == 40) {
      ASSERT_EQ(kill(ix->pid(), SIGCONT), 0);
    }
    // Killed at step 44 and restarted empty on its port: the prediction of step 48 finds the
    // session gone and the worker registers it again from the kvstore.
    if (st == 44) {
      const int port = ix->port();
      ix.reset();  // SIGKILL
      ix = Start("fm-indexer", {"--port", std::to_string(port)});
      ASSERT_NE(ix, nullptr);
    }
    v1::DecodeBatch b;
    *b.add_requests() = src.Request(st, 0, sp.layers);
    auto r = stream->Run(b);
    ASSERT_THAT(r, IsOk());
    ASSERT_EQ(r->results(0).code(), 0) << "step " << st << ": " << r->results(0).message();
    std::memcpy(got.out.data() + size_t{st} * sp.layers * qs, r->results(0).out().data(),
                sp.layers * qs * 4);
    std::memcpy(got.lse.data() + size_t{st} * sp.layers * sp.q_heads, r->results(0).lse().data(),
                sp.layers * sp.q_heads * 4);
  }
  EXPECT_THAT(stream->Finish(), IsOk());
  auto stats = client->Stats("x");
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->steps(), 64u);
  EXPECT_EQ(stats->prediction_failures(), 1u);  // step 32's; the set of step 16 kept serving
  EXPECT_EQ(stats->predictions(), 4u);          // step 48's went through again
  EXPECT_EQ(stats->reregistrations(), 1u);
  // The restarted indexer holds the session's whole sealed history again.
  auto ixc = indexer::IndexerClient::Connect(ix->target(), 10000);
  ASSERT_THAT(ixc, IsOk());
  auto ixs = (*ixc)->Stats(0);
  ASSERT_THAT(ixs, IsOk());
  EXPECT_EQ(ixs->sessions(), 1u);
  EXPECT_EQ(ixs->chunks(), (stats->tokens() / sp.page_tokens) * sp.ChunksPerPage());
  const replay::Fidelity f = replay::Compare(sp, got, *dense);
  EXPECT_GT(f.cosine_mean, 0.95);
  EXPECT_GT(f.mass_recall, 0.8);
}

TEST_F(DecodeProcessTest, ReopenedOnASecondWorkerContinuesWithIdenticalOutputs) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto ref = Run(one->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());

  auto kv =
      Start("fm-kvstore", {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::vector<std::string> args = {"--kvstore",  kv->target(),      "--indexer",
                                         ix->target(), "--reserve_bytes", "64MiB"};
  auto a = Start("fm-decode", args);
  auto b = Start("fm-decode", args);
  ASSERT_TRUE(a && b);
  const ModelSpec& sp = g_->spec();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  auto steps = [&](DecodeClient& c, uint32_t from, uint32_t to) {
    auto stream = c.OpenStream();
    for (uint32_t st = from; st < to; ++st) {
      v1::DecodeBatch batch;
      *batch.add_requests() = src.Request(st, 0, sp.layers);  // whole steps
      auto r = stream->Run(batch);
      ASSERT_THAT(r, IsOk());
      ASSERT_EQ(r->results(0).code(), 0) << r->results(0).message();
      std::memcpy(out.data() + size_t{st} * sp.layers * qs, r->results(0).out().data(),
                  sp.layers * qs * 4);
    }
    EXPECT_THAT(stream->Finish(), IsOk());
  };
  auto ca = DecodeClient::Connect(a->target(), 10000).value();
  ASSERT_THAT(OpenQuest(*ca, "r"), IsOk());
  steps(*ca, 0, 41);
  ASSERT_THAT(ca->Close("r"), IsOk());
  // The client reopens the session on the other worker and goes on.
  auto cb = DecodeClient::Connect(b->target(), 10000).value();
  SessionOptions resume;
  resume.resume = true;
  ASSERT_THAT(cb->Open("r", resume), IsOk());
  auto st = cb->Stats("r");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->steps(), 41u);
  EXPECT_EQ(st->tokens(), 4041u);
  steps(*cb, 41, 64);
  EXPECT_LT(MaxDiff(out, ref->out), 1e-6);
  // A second resume of an open session is refused; an unknown one has nothing to resume.
  EXPECT_THAT(cb->Open("r", resume), StatusIs(Code::kAlreadyExists));
  EXPECT_THAT(cb->Open("nobody", resume), StatusIs(Code::kNotFound));
}

// A worker killed at step 5, before the session's first seal (step 31): the state saved
// when the prefill completed resumes it on another worker from step 0, with the
// undisturbed run's outputs.
TEST_F(DecodeProcessTest, AWorkerLostBeforeTheFirstSealLeavesTheSessionResumable) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto ref = Run(one->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());
  auto kv =
      Start("fm-kvstore", {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::vector<std::string> args = {"--kvstore",  kv->target(),      "--indexer",
                                         ix->target(), "--reserve_bytes", "64MiB"};
  auto a = Start("fm-decode", args);
  auto b = Start("fm-decode", args);
  ASSERT_TRUE(a && b);
  const ModelSpec& sp = g_->spec();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  auto steps = [&](DecodeClient& c, uint32_t from, uint32_t to) {
    auto stream = c.OpenStream();
    for (uint32_t st = from; st < to; ++st) {
      v1::DecodeBatch batch;
      *batch.add_requests() = src.Request(st, 0, sp.layers);
      auto r = stream->Run(batch);
      ASSERT_THAT(r, IsOk());
      ASSERT_EQ(r->results(0).code(), 0) << r->results(0).message();
      std::memcpy(out.data() + size_t{st} * sp.layers * qs, r->results(0).out().data(),
                  sp.layers * qs * 4);
    }
    EXPECT_THAT(stream->Finish(), IsOk());
  };
  {
    auto ca = DecodeClient::Connect(a->target(), 10000).value();
    ASSERT_THAT(OpenQuest(*ca, "r"), IsOk());
    steps(*ca, 0, 5);
  }
  ASSERT_TRUE(WIFSIGNALED(a->Stop(SIGKILL)));
  auto cb = DecodeClient::Connect(b->target(), 10000).value();
  SessionOptions resume;
  resume.resume = true;
  ASSERT_THAT(cb->Open("r", resume), IsOk());
  auto st = cb->Stats("r");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->steps(), 0u);
  EXPECT_EQ(st->tokens(), 4000u);
  steps(*cb, 0, 64);
  EXPECT_LT(MaxDiff(out, ref->out), 1e-6);
  EXPECT_TRUE(b->Alive());
}

// One client steps a session on fm-decode while two others close and resume it in a loop
// (what crashed the worker, or answered steps OK with other outputs, before): the worker
// stays up, every call answers OK or a precise code, every step answered OK gives the
// undisturbed run's output.
TEST_F(DecodeProcessTest, ClientsRacingStepsResumesAndClosesOfOneSession) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto ref = Run(one->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());
  auto kv =
      Start("fm-kvstore", {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  auto dec = Start("fm-decode", {"--kvstore", kv->target(), "--indexer", ix->target(),
                                 "--reserve_bytes", "64MiB"});
  ASSERT_NE(dec, nullptr);
  const ModelSpec& sp = g_->spec();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  {
    auto c = DecodeClient::Connect(dec->target(), 10000).value();
    ASSERT_THAT(OpenQuest(*c, "r"), IsOk());
  }
  std::atomic<bool> done{false};
  std::atomic<int> closes{0}, resumes{0}, bad{0};
  auto ok_code = [&](const absl::Status& s) {
    if (s.ok() || s.code() == Code::kNotFound || s.code() == Code::kUnavailable ||
        s.code() == Code::kAlreadyExists)
      return;
    ++bad;
    ADD_FAILURE() << s;
  };
  auto racer = [&](int seed) {
    auto c = DecodeClient::Connect(dec->target(), 10000).value();
    SessionOptions resume;
    resume.resume = true;
    unsigned r = seed;
    const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!done && std::chrono::steady_clock::now() < stop) {
      absl::Status cs = c->Close("r");
      ok_code(cs);
      if (cs.ok()) ++closes;
      usleep(rand_r(&r) % 20000);
      auto os = c->Open("r", resume);
      ok_code(os.status());
      if (os.ok()) ++resumes;
      usleep(rand_r(&r) % 20000);
    }
  };
  std::thread t1(racer, 1), t2(racer, 2);
  auto c = DecodeClient::Connect(dec->target(), 10000).value();
  replay::StepSource src(*g_, "r", 16);
  uint32_t st = 0, l = 0, ok_steps = 0, wrong = 0, retries = 0;
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  auto stream = c->OpenStream();
  while (st < 64 && std::chrono::steady_clock::now() < stop) {
    v1::DecodeBatch b;
    *b.add_requests() = src.Request(st, l, 1);
    auto r = stream->Run(b);
    ASSERT_THAT(r, IsOk());
    const v1::LayerResult& lr = r->results(0);
    if (lr.code() == 0) {
      ++ok_steps;
      std::vector<float> got(qs), want(qs);
      std::memcpy(got.data(), lr.out().data(), qs * 4);
      std::memcpy(want.data(), ref->out.data() + (size_t{st} * sp.layers + l) * qs, qs * 4);
      if (MaxDiff(got, want) > 1e-6) {
        ++wrong;
        ADD_FAILURE() << "step " << st << " layer " << l << " answered OK with another output";
      }
      if (++l == sp.layers) l = 0, ++st;
      continue;
    }
    ++retries;
    if (lr.code() == int(Code::kFailedPrecondition)) {  // the session went back to a step
      auto s = c->Stats("r");
      if (s.ok()) st = static_cast<uint32_t>(s->steps()), l = 0;
    } else {
      ASSERT_EQ(lr.code(), int(Code::kNotFound)) << lr.message();
    }
    usleep(2000);
  }
  done = true;
  t1.join();
  t2.join();
  EXPECT_THAT(stream->Finish(), IsOk());
  EXPECT_EQ(st, 64u);
  EXPECT_EQ(wrong, 0u) << "of " << ok_steps;
  EXPECT_EQ(bad, 0);
  EXPECT_GE(closes, 3);
  EXPECT_GE(resumes, 3);
  EXPECT_TRUE(dec->Alive());
  std::printf("steps ok %u, retried %u, closes %d, resumes %d\n", ok_steps, retries,
              closes.load(), resumes.load());
  EXPECT_EQ(dec->Stop(SIGTERM), 0);
}

// A second server on a port already served refuses to start (before, SO_REUSEPORT let a
// second fm-kvstore share the port and half the acknowledged pages read back NOT_FOUND).
TEST_F(DecodeProcessTest, EveryServerRefusesAPortAlreadyServed) {
  auto kv = Start("fm-kvstore", {"--db", dir_ + "/kv1", "--ram_bytes", "16MiB", "--slab_bytes",
                                 "4MiB", "--no_ucx"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::string port = std::to_string(kv->port());
  const std::vector<std::pair<std::string, std::vector<std::string>>> second = {
      {"fm-kvstore", {"--db", dir_ + "/kv2", "--ram_bytes", "16MiB", "--slab_bytes", "4MiB",
                      "--no_ucx"}},
      {"fm-indexer", {}},
      {"fm-decode", {"--kvstore", kv->target(), "--indexer", ix->target(), "--reserve_bytes",
                     "16MiB", "--no_ucx"}},
      {"flashmemory", {"--data_dir", dir_ + "/one", "--ram_bytes", "16MiB", "--reserve_bytes",
                       "16MiB"}}};
  for (auto [bin, args] : second) {
    args.insert(args.end(), {"--port", port});
    auto p = ServerProcess::Start(bin, args, 20000);
    EXPECT_FALSE(p.ok()) << bin << " started on port " << port << ", which fm-kvstore serves";
    if (!p.ok()) {
      EXPECT_THAT(p.status(), StatusIs(Code::kInternal)) << bin;  // exited during start-up
    }
  }
  // The first server still serves every write it acknowledges.
  KvClientOptions ko;
  ko.use_ucx = false;
  auto c = KvClient::Connect(kv->target(), ko);
  ASSERT_THAT(c, IsOk());
  for (uint64_t p = 0; p < 20; ++p) {
    const std::string payload = RandomBytes(256, p);
    ASSERT_THAT((*c)->Put(MakePageHeader("s", p, 1, 1, DType::kFp32, payload.data(), 256),
                          payload.data()),
                IsOk());
  }
  std::vector<PageRef> keys;
  for (uint64_t p = 0; p < 20; ++p) keys.push_back({"s", p});
  EXPECT_THAT((*c)->Get(keys), IsOk());
}

// A close drops the session from the indexer: with room for 3 sessions there, 5 sessions
// one after the other all run and close OK (the 4th failed its first step with
// RESOURCE_EXHAUSTED before, and its close reported RESOURCE_EXHAUSTED though it closed),
// and a closed session still resumes (the indexer gets its history again).
TEST_F(DecodeProcessTest, ClosedSessionsLeaveTheIndexer) {
  auto server = Start("flashmemory", {"--data_dir", dir_ + "/one", "--ram_bytes", "64MiB",
                                      "--reserve_bytes", "64MiB", "--indexer_max_sessions", "3"});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<replay::ReplayResult> first;
  for (int i = 0; i < 5; ++i) {
    auto r = Run(server->target(), absl::StrCat("s", i), Mode::kSparse, 0.25f,
                 indexer::Policy::kQuest);
    ASSERT_THAT(r, IsOk()) << "session " << i;
    EXPECT_EQ(r->stats.prediction_failures(), 0u) << "session " << i;
    if (i == 0) {
      first = std::make_unique<replay::ReplayResult>(*r);
    } else {
      EXPECT_LT(MaxDiff(r->out, first->out), 1e-6);  // the same generated session
    }
  }
  auto client = DecodeClient::Connect(server->target(), 10000).value();
  SessionOptions resume;
  resume.resume = true;
  ASSERT_THAT(client->Open("s0", resume), IsOk());
  auto st = client->Stats("s0");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->tokens(), 4064u);
  ASSERT_THAT(client->Close("s0"), IsOk());
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

// The kvstore deletes a closed session's pages --closed_session_ttl after its close; a
// resumed one (its worker writes its state at once) stays.
TEST_F(DecodeProcessTest, ClosedSessionsLeaveTheKvstoreAfterTheirTtl) {
  auto server = Start("flashmemory", {"--data_dir", dir_ + "/one", "--ram_bytes", "64MiB",
                                      "--reserve_bytes", "64MiB", "--closed_session_ttl", "2"});
  ASSERT_NE(server, nullptr);
  ASSERT_THAT(Run(server->target(), "a", Mode::kSparse, 0.25f, indexer::Policy::kQuest), IsOk());
  ASSERT_THAT(Run(server->target(), "b", Mode::kSparse, 0.25f, indexer::Policy::kQuest), IsOk());
  auto client = DecodeClient::Connect(server->target(), 10000).value();
  SessionOptions resume;
  resume.resume = true;
  ASSERT_THAT(client->Open("b", resume), IsOk());  // b is served again
  sleep(5);  // past the TTL (2 s) and the next sweep (every second)
  EXPECT_THAT(client->Open("a", resume), StatusIs(Code::kNotFound));
  ASSERT_THAT(client->Close("b"), IsOk());
  ASSERT_THAT(client->Open("b", resume), IsOk());
  auto st = client->Stats("b");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->tokens(), 4064u);
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

// Two workers, one session: worker B resumes it while worker A still serves it (before,
// both sealed and a later resume continued a history that differed from either). B's
// claim fences A: A's next seal fails with ABORTED and every later call of it too, nothing
// A writes after it lands, B gives the undisturbed outputs, and a later resume on A
// continues B's history.
TEST_F(DecodeProcessTest, ASessionHasOneOwnerAtATime) {
  auto one = AllInOne("one");
  ASSERT_NE(one, nullptr);
  auto ref = Run(one->target(), "r", Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  ASSERT_THAT(ref, IsOk());
  auto kv =
      Start("fm-kvstore", {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::vector<std::string> args = {"--kvstore",  kv->target(),      "--indexer",
                                         ix->target(), "--reserve_bytes", "64MiB"};
  auto a = Start("fm-decode", args);
  auto b = Start("fm-decode", args);
  ASSERT_TRUE(a && b);
  const ModelSpec& sp = g_->spec();
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  // Runs whole steps [from, to); the code of the first that fails.
  auto steps = [&](DecodeClient::Stream& stream, uint32_t from, uint32_t to) -> int {
    for (uint32_t st = from; st < to; ++st) {
      v1::DecodeBatch batch;
      *batch.add_requests() = src.Request(st, 0, sp.layers);
      auto r = stream.Run(batch);
      if (!r.ok()) return int(Code::kInternal);
      if (r->results(0).code() != 0) return r->results(0).code();
      std::memcpy(out.data() + size_t{st} * sp.layers * qs, r->results(0).out().data(),
                  sp.layers * qs * 4);
    }
    return 0;
  };
  auto ca = DecodeClient::Connect(a->target(), 10000).value();
  auto cb = DecodeClient::Connect(b->target(), 10000).value();
  ASSERT_THAT(OpenQuest(*ca, "r"), IsOk());
  auto sa = ca->OpenStream();
  ASSERT_EQ(steps(*sa, 0, 20), 0);
  SessionOptions resume;
  resume.resume = true;
  ASSERT_THAT(cb->Open("r", resume), IsOk());  // A still holds it
  auto st = cb->Stats("r");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->steps(), 0u);  // the state A saved when the prefill completed
  // A goes on: its steps run on what it holds until the seal of step 31 meets the fence.
  EXPECT_EQ(steps(*sa, 20, 64), int(Code::kAborted));
  auto as = ca->Stats("r");
  ASSERT_THAT(as, IsOk());
  EXPECT_EQ(as->steps(), 31u);
  EXPECT_EQ(steps(*sa, 31, 32), int(Code::kAborted));  // and every later call
  EXPECT_THAT(ca->Close("r"), StatusIs(Code::kAborted, "moved to another worker"));
  // B decodes the whole session from the saved state: the undisturbed outputs.
  auto sb = cb->OpenStream();
  ASSERT_EQ(steps(*sb, 0, 64), 0);
  EXPECT_LT(MaxDiff(out, ref->out), 1e-6);
  EXPECT_THAT(sb->Finish(), IsOk());
  ASSERT_THAT(cb->Close("r"), IsOk());
  // A later resume on A continues B's history.
  ASSERT_THAT(ca->Open("r", resume), IsOk());
  st = ca->Stats("r");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->steps(), 64u);
  EXPECT_EQ(st->tokens(), 4064u);
  EXPECT_TRUE(a->Alive() && b->Alive());
}

// A batch beyond --max_batch_requests ends its stream with RESOURCE_EXHAUSTED before any
// of it runs; batches within it run, and other streams are untouched.
TEST_F(DecodeProcessTest, ABatchBeyondTheLimitIsRefusedWhole) {
  auto server = Start("flashmemory", {"--data_dir", dir_ + "/one", "--ram_bytes", "64MiB",
                                      "--reserve_bytes", "64MiB", "--max_batch_requests", "4"});
  ASSERT_NE(server, nullptr);
  auto client = DecodeClient::Connect(server->target(), 10000).value();
  ASSERT_THAT(OpenQuest(*client, "a"), IsOk());
  replay::StepSource src(*g_, "a", 16);
  auto other = client->OpenStream();
  auto flood = client->OpenStream();
  v1::DecodeBatch big;
  for (int i = 0; i < 5; ++i) {
    v1::LayerRequest r = src.Request(0, 0, 1);
    r.set_session_id("ghost" + std::to_string(i));
    *big.add_requests() = r;
  }
  EXPECT_THAT(flood->Run(big), StatusIs(Code::kResourceExhausted, "the limit is 4"));
  big.mutable_requests()->RemoveLast();  // 4: within the limit
  auto second = client->OpenStream();
  auto within = second->Run(big);
  ASSERT_THAT(within, IsOk());
  EXPECT_EQ(within->results(3).code(), int(Code::kNotFound));
  EXPECT_THAT(second->Finish(), IsOk());
  v1::DecodeBatch one;
  *one.add_requests() = src.Request(0, 0, g_->spec().layers);
  auto r = other->Run(one);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->results(0).code(), 0) << r->results(0).message();
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

TEST_F(DecodeProcessTest, BadInputGetsPreciseCodesAndTheStreamStaysUp) {
  auto server = AllInOne("one");
  ASSERT_NE(server, nullptr);
  auto client = DecodeClient::Connect(server->target(), 10000).value();
  SessionOptions so;
  so.spec = g_->spec();
  so.mode = Mode::kDense;
  so.max_tokens = 4064;
  EXPECT_THAT(client->Open("", so), StatusIs(Code::kInvalidArgument));
  SessionOptions zero = so;
  zero.max_tokens = 0;
  EXPECT_THAT(client->Open("x", zero), StatusIs(Code::kInvalidArgument, "max_tokens"));
  SessionOptions huge = so;
  huge.max_tokens = 1ull << 24;  // far beyond a 64 MiB reserve
  EXPECT_THAT(client->Open("x", huge), StatusIs(Code::kResourceExhausted, "cannot admit"));
  SessionOptions oracle = so;
  oracle.mode = Mode::kSparse;
  oracle.policy = indexer::Policy::kOracle;
  EXPECT_THAT(client->Open("x", oracle), StatusIs(Code::kInvalidArgument, "oracle"));
  {  // An unknown mode (it ran as sparse before) and lengths beyond any session's.
    auto stub = v1::Decode::NewStub(
        grpc::CreateChannel(server->target(), grpc::InsecureChannelCredentials()));
    v1::OpenSessionRequest req;
    req.set_session_id("m");
    SpecToProto(so.spec, req.mutable_spec());
    req.set_max_tokens(4064);
    req.set_mode(static_cast<v1::DecodeMode>(99));
    v1::OpenSessionResponse resp;
    grpc::ClientContext c1;
    grpc::Status st = stub->OpenSession(&c1, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("unknown mode 99"), std::string::npos) << st.error_message();
    req.set_mode(v1::DECODE_MODE_SPARSE);
    req.set_max_tokens(UINT64_MAX);
    grpc::ClientContext c2;
    st = stub->OpenSession(&c2, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("max_tokens must be in [1, 16777216]"), std::string::npos)
        << st.error_message();
    req.set_max_tokens(4064);
    req.set_tau(UINT32_MAX);
    grpc::ClientContext c3;
    st = stub->OpenSession(&c3, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("tau must be in [0, 1024]"), std::string::npos)
        << st.error_message();
  }
  ASSERT_THAT(client->Open("a", so), IsOk());
  EXPECT_THAT(client->Open("a", so), StatusIs(Code::kAlreadyExists));
  // Prefill: unknown session, misaligned tokens.
  EXPECT_THAT(client->Prefill("nope", so.spec, prefill_.pages.data(), 1, 64, nullptr, 0),
              StatusIs(Code::kNotFound));
  ASSERT_THAT(client->Prefill("a", so.spec, prefill_.pages.data(), prefill_.n_pages, 4000,
                              prefill_.keys.data(), prefill_.chunks),
              IsOk());
  EXPECT_THAT(client->Prefill("a", so.spec, prefill_.pages.data(), 1, 64, nullptr, 0),
              StatusIs(Code::kFailedPrecondition));

  replay::StepSource src(*g_, "a", 16);
  auto stream = client->OpenStream();
  v1::DecodeBatch b;
  v1::LayerRequest good = src.Request(0, 0, 1);
  v1::LayerRequest ghost = good;
  ghost.set_session_id("ghost");
  v1::LayerRequest short_q = good;
  short_q.mutable_q()->resize(good.q().size() - 4);
  v1::LayerRequest wrong_step = good;
  wrong_step.set_step(5);
  v1::LayerRequest bad_layer = good;
  bad_layer.set_layer(7);
  v1::LayerRequest bad_hidden = good;
  bad_hidden.mutable_hidden()->resize(12);
  for (const auto& r : {ghost, short_q, wrong_step, bad_layer, bad_hidden, good})
    *b.add_requests() = r;
  auto res = stream->Run(b);
  ASSERT_THAT(res, IsOk());
  ASSERT_EQ(res->results_size(), 6);
  EXPECT_EQ(res->results(0).code(), int(Code::kNotFound));
  EXPECT_EQ(res->results(1).code(), int(Code::kInvalidArgument));
  EXPECT_NE(res->results(1).message().find("expected q [1][4][64]"), std::string::npos)
      << res->results(1).message();
  EXPECT_EQ(res->results(2).code(), int(Code::kFailedPrecondition));
  EXPECT_EQ(res->results(3).code(), int(Code::kInvalidArgument));
  EXPECT_EQ(res->results(4).code(), int(Code::kInvalidArgument));
  EXPECT_EQ(res->results(5).code(), 0) << res->results(5).message();
  // A step stream that breaks mid-step: the client resends the step from layer 0.
  stream.reset();
  stream = client->OpenStream();
  for (uint32_t l = 0; l < 2; ++l) {
    v1::DecodeBatch one;
    *one.add_requests() = src.Request(0, l, 1);
    auto r = stream->Run(one);
    ASSERT_THAT(r, IsOk());
    EXPECT_EQ(r->results(0).code(), 0) << r->results(0).message();
  }
  auto stats = client->Stats("a");
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->steps(), 1u);
  EXPECT_THAT(stream->Finish(), IsOk());
  ASSERT_THAT(client->Close("a"), IsOk());
  EXPECT_THAT(client->Close("a"), StatusIs(Code::kNotFound));
  EXPECT_THAT(client->Stats("a"), StatusIs(Code::kNotFound));
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

}  // namespace
}  // namespace fm::decode
