// The decode worker under the faults a cluster sees every day, on real processes: kvstore
// restarts over UCX and gRPC, a worker lost before its first seal, clients racing steps,
// resumes and closes of one session, two workers resuming one session, closed sessions
// leaving the indexer and (after their TTL) the kvstore, a second server on a served port.
#include "tests/decode_process_fixture.h"

namespace fm::decode {
namespace {

// The kvstore goes down at step 21 of a quest session (SIGKILL, or SIGTERM) and comes back
// on its port, at once or only after a step failed against it; over UCX or gRPC only. The
// worker must stay up, fail only the steps that need the store while it is down, and go on
// with the undisturbed run's outputs (over UCX: a new endpoint and remote key to the new
// instance, never a read of the old one's arena).
void DecodeProcessTest::RestartKvstoreMidSession(bool ucx, int sig, bool restart_at_once) {
  auto ref = UndisturbedQuestRun();
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

// The indexer is killed at step 21 and is back 1.5 s later: the prediction of the cycle at
// step 32 retries (--peer_retry_ms) and gives the session to the new indexer, the step at
// the switch waits for it, and the session answers as the undisturbed run. (Before: the
// cycle lost its prediction at once and the set before it served.)
TEST_F(DecodeProcessTest, AnIndexerRestartCostsTheCycleAWaitNotItsPrediction) {
  auto ref = UndisturbedQuestRun(true);
  ASSERT_THAT(ref, IsOk());
  auto kv = Start("fm-kvstore",
                  {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes", "4MiB"});
  auto ix = Start("fm-indexer", {});
  ASSERT_TRUE(kv && ix);
  const std::string ix_port = std::to_string(ix->port());
  auto dec = Start("fm-decode", {"--kvstore", kv->target(), "--indexer", ix->target(),
                                 "--reserve_bytes", "64MiB", "--peer_retry_ms", "20000"});
  ASSERT_NE(dec, nullptr);
  auto client = DecodeClient::Connect(dec->target(), 30000).value();
  ASSERT_THAT(OpenQuest(*client, "r"), IsOk());
  replay::StepSource src(*g_, "r", 16);
  auto stream = client->OpenStream();
  std::vector<float> out(ref->out.size());
  ASSERT_EQ(WholeSteps(*stream, src, 0, 21, &out), 0);
  ASSERT_TRUE(WIFSIGNALED(ix->Stop(SIGKILL)));
  // The new indexer is started from a thread that lives until the steps are done: a child
  // gets SIGKILL when the thread that forked it ends (PR_SET_PDEATHSIG).
  std::atomic<bool> done{false};
  std::thread restart([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    ix = Start("fm-indexer", {"--port", ix_port});
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  });
  for (uint32_t st = 21; st < 64; ++st) {
    int code = WholeSteps(*stream, src, st, st + 1, &out);
    // A seal that hands the indexer its keys meets it down: the step fails whole, retryable.
    for (int tries = 0; tries < 100 && code == int(Code::kUnavailable); ++tries) {
      usleep(100000);
      code = WholeSteps(*stream, src, st, st + 1, &out);
    }
    if (code != 0) done = true;
    ASSERT_EQ(code, 0) << "step " << st;
  }
  auto stats = client->Stats("r");
  done = true;
  restart.join();
  ASSERT_NE(ix, nullptr);
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->steps(), 64u);
  EXPECT_EQ(stats->prediction_failures(), 0u);
  EXPECT_GE(stats->reregistrations(), 1u);  // the new indexer got the session again
  EXPECT_LT(MaxDiff(out, ref->out), 1e-6);
  EXPECT_THAT(stream->Finish(), IsOk());
  EXPECT_EQ(dec->Stop(SIGTERM), 0);
}


// A worker killed at step 5, before the session's first seal (step 31): the state saved
// when the prefill completed resumes it on another worker from step 0, with the
// undisturbed run's outputs.
TEST_F(DecodeProcessTest, AWorkerLostBeforeTheFirstSealLeavesTheSessionResumable) {
  auto ref = UndisturbedQuestRun();
  ASSERT_THAT(ref, IsOk());
  TwoWorkers c = StartTwoWorkers();
  ASSERT_TRUE(c.kv && c.ix && c.a && c.b);
  auto& a = c.a;
  auto& b = c.b;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  auto steps = [&](DecodeClient& client, uint32_t from, uint32_t to) {
    auto stream = client.OpenStream();
    ASSERT_EQ(WholeSteps(*stream, src, from, to, &out), 0);
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
  auto ref = UndisturbedQuestRun();
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
// resumed one (its worker claims it, a write) stays.
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
  auto ref = UndisturbedQuestRun();
  ASSERT_THAT(ref, IsOk());
  TwoWorkers c = StartTwoWorkers();
  ASSERT_TRUE(c.kv && c.ix && c.a && c.b);
  auto& a = c.a;
  auto& b = c.b;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  auto steps = [&](DecodeClient::Stream& stream, uint32_t from, uint32_t to) {
    return WholeSteps(stream, src, from, to, &out);
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

}  // namespace
}  // namespace fm::decode
