// Integration tests of the decode worker: real flashmemory, fm-decode, fm-kvstore and
// fm-indexer processes on loopback, driven by the replay client. Faults (restarts, races,
// owners, closed sessions) are in decode_faults_test.cc.
#include "tests/decode_process_fixture.h"

namespace fm::decode {
namespace {

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

  TwoWorkers c = StartTwoWorkers();
  ASSERT_TRUE(c.kv && c.ix && c.a && c.b);
  auto& a = c.a;
  auto& b = c.b;
  std::vector<float> out(ref->out.size());
  replay::StepSource src(*g_, "r", 16);
  auto steps = [&](DecodeClient& client, uint32_t from, uint32_t to) {  // whole steps
    auto stream = client.OpenStream();
    ASSERT_EQ(WholeSteps(*stream, src, from, to, &out), 0);
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
  EXPECT_THAT(other->Finish(), IsOk());
  EXPECT_EQ(server->Stop(SIGTERM), 0);
}

// Refused requests beyond --refused_bytes_per_s get their answers late, while a served
// session's steps on another stream do not wait; a drain answers what the throttle holds.
TEST_F(DecodeProcessTest, RefusedFloodsWaitForTheThrottleAndServedStepsDoNot) {
  replay::StepSource src(*g_, "a", 16);
  v1::DecodeBatch ghosts;
  for (int i = 0; i < 4; ++i) {
    v1::LayerRequest r = src.Request(0, 0, 1);
    r.set_session_id("ghost" + std::to_string(i));
    *ghosts.add_requests() = r;
  }
  // One batch is 4 s worth of refusals: the first overdraws the one-second bucket by 3 s.
  const size_t rate = ghosts.ByteSizeLong() / 4;
  auto server = Start("flashmemory", {"--data_dir", dir_ + "/one", "--ram_bytes", "64MiB",
                                      "--reserve_bytes", "64MiB", "--refused_bytes_per_s",
                                      std::to_string(rate), "--metrics_port", "0"});
  ASSERT_NE(server, nullptr);
  auto client = DecodeClient::Connect(server->target(), 10000).value();
  ASSERT_THAT(OpenQuest(*client, "a"), IsOk());
  auto served = client->OpenStream();
  auto flood = client->OpenStream();
  std::atomic<bool> answered{false};
  absl::StatusOr<v1::DecodeResults> refused;
  const auto start = std::chrono::steady_clock::now();
  std::thread t([&] {
    refused = flood->Run(ghosts);
    answered = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (uint32_t step = 0; step < 4; ++step) {
    v1::DecodeBatch one;
    *one.add_requests() = src.Request(step, 0, g_->spec().layers);
    auto r = served->Run(one);
    ASSERT_THAT(r, IsOk());
    EXPECT_EQ(r->results(0).code(), 0) << r->results(0).message();
  }
  EXPECT_FALSE(answered);  // the served steps went first
  t.join();
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(2900));
  ASSERT_THAT(refused, IsOk());
  ASSERT_EQ(refused->results_size(), 4);
  for (const auto& r : refused->results()) EXPECT_EQ(r.code(), int(Code::kNotFound));
  httplib::Client http("127.0.0.1", server->metrics_port());
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res && res->status == 200);
  const std::string& metrics = res->body;
  EXPECT_THAT(metrics, HasSubstr("fm_decode_throttled_answers_total 1\n"));
  size_t bytes = 0;  // each refused request is charged its own bytes
  for (const auto& r : ghosts.requests()) bytes += r.ByteSizeLong();
  EXPECT_THAT(metrics, HasSubstr(absl::StrCat("fm_decode_refused_bytes_total ", bytes, "\n")));
  // The next refused batch would wait 4 s more; a SIGTERM answers it at once and drains.
  std::thread t2([&] { refused = flood->Run(ghosts); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto stop = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server->pid(), SIGTERM), 0);
  t2.join();
  EXPECT_LT(std::chrono::steady_clock::now() - stop, std::chrono::milliseconds(3500));
  ASSERT_THAT(refused, IsOk());
  EXPECT_EQ(refused->results(0).code(), int(Code::kNotFound));
  EXPECT_THAT(flood->Finish(), IsOk());
  EXPECT_THAT(served->Finish(), IsOk());
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
