// Integration tests: real fm-indexer and flashmemory processes on loopback.
#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <random>

#include "common/spec_proto.h"
#include "common/status.h"
#include "common/status_matchers.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"
#include "workload/generator.h"

namespace fm::indexer {
namespace {
namespace v1 = flashmemory::v1;
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;
using Code = absl::StatusCode;

class IndexerProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("fm_ixit");
    workload::SessionConfig c;
    c.spec = *PresetSpec("tiny");
    c.seed = 4;
    c.prefill_tokens = 3000;
    c.steps = 64;
    session_ = *workload::Session::Generate(c);
    spec_ = c.spec;
    chunks_ = 46 * spec_.ChunksPerPage();  // sealed pages of 3000 tokens
    for (uint32_t l = 0; l < spec_.index_layers; ++l)
      keys_.insert(keys_.end(), session_->index_keys(l).begin(),
                   session_->index_keys(l).begin() + chunks_ * spec_.IndexKeyBytes());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<ServerProcess> Start(const std::string& bin,
                                       std::vector<std::string> extra = {}) {
    auto p = ServerProcess::Start(bin, extra);
    EXPECT_THAT(p, IsOk());
    return p.ok() ? std::move(*p) : nullptr;
  }
  // Random tower weights for the tiny spec, saved to a file.
  std::string SaveWeights() {
    Weights w;
    w.shape = workload::IndexerShapeFor(spec_, 16);
    std::mt19937 rng(9);
    std::normal_distribution<float> nd(0.0f, 0.1f);
    auto rnd = [&](size_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = nd(rng);
      return v;
    };
    w.w_a.push_back(rnd(16 * spec_.hidden_dim));
    w.g.push_back(std::vector<float>(16, 1.0f));
    w.w_b.push_back(rnd(size_t{spec_.index_heads} * spec_.index_dim * 16));
    w.w_w.push_back(rnd(size_t{spec_.index_heads} * spec_.hidden_dim));
    const std::string path = dir_ + "/w.safetensors";
    EXPECT_THAT(w.Save(path), IsOk());
    return path;
  }

  std::string dir_;
  std::unique_ptr<workload::Session> session_;
  ModelSpec spec_;
  uint64_t chunks_ = 0;
  std::vector<uint8_t> keys_;
};

std::vector<uint64_t> Pages(const Prediction& p) {
  std::vector<uint64_t> v;
  for (const auto& x : p.pages) v.push_back(x.page);
  return v;
}

TEST_F(IndexerProcessTest, TwoReplicasPlaceSessionsByHashAndPredictLikeTheCore) {
  auto a = Start("fm-indexer"), b = Start("fm-indexer");
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  auto client = IndexerClient::Connect(a->target() + "," + b->target());
  ASSERT_THAT(client, IsOk());
  for (int i = 0; i < 16; ++i)
    ASSERT_THAT((*client)->Register("s" + std::to_string(i), spec_, keys_.data(), chunks_, 3000),
                IsOk());
  auto sa = (*client)->Stats(0), sb = (*client)->Stats(1);
  ASSERT_THAT(sa, IsOk());
  ASSERT_THAT(sb, IsOk());
  EXPECT_EQ(sa->sessions() + sb->sessions(), 16u);
  EXPECT_GT(sa->sessions(), 0u);
  EXPECT_GT(sb->sessions(), 0u);
  // The replica that does not hold a session answers NOT_FOUND.
  const size_t home = (*client)->ReplicaFor("s0");
  auto other = IndexerClient::Connect((*client)->replicas()[1 - home]);
  PredictArgs args;
  args.policy = Policy::kSinkRecency;
  EXPECT_THAT((*other)->Predict("s0", args).status(), StatusIs(Code::kNotFound));
  auto p = (*client)->Predict("s0", args);
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 43, 44, 45, 46}));
  // lsa after LoadWeights on every replica equals the in-process core on the same input.
  const std::string wpath = SaveWeights();
  auto hash = (*client)->LoadWeights(wpath);
  ASSERT_THAT(hash, IsOk());
  args.policy = Policy::kLsa;
  args.budget = 0.3f;
  args.hidden.assign(session_->hidden(0), session_->hidden(0) + spec_.hidden_dim);
  auto remote = (*client)->Predict("s3", args);
  ASSERT_THAT(remote, IsOk());
  IndexerCore core;
  ASSERT_THAT(core.LoadWeights(wpath), IsOk());
  ASSERT_THAT(core.Register("s3", spec_, keys_.data(), chunks_, 3000), IsOk());
  auto local = core.Predict("s3", args);
  ASSERT_THAT(local, IsOk());
  EXPECT_EQ(Pages(*remote), Pages(*local));
  EXPECT_EQ(remote->chunks_scored, chunks_);
  // Appending moves the tail; dropping forgets.
  std::vector<uint8_t> more;
  for (uint32_t l = 0; l < spec_.index_layers; ++l)
    more.insert(more.end(), session_->index_keys(l).begin() + chunks_ * spec_.IndexKeyBytes(),
                session_->index_keys(l).begin() + (chunks_ + 16) * spec_.IndexKeyBytes());
  ASSERT_THAT((*client)->Append("s0", spec_, more.data(), chunks_, 16, 3100), IsOk());
  args = PredictArgs{};
  args.policy = Policy::kSinkRecency;  // 49 pages now
  EXPECT_EQ(Pages(*(*client)->Predict("s0", args)), (std::vector<uint64_t>{0, 45, 46, 47, 48}));
  ASSERT_THAT((*client)->Drop("s0"), IsOk());
  EXPECT_THAT((*client)->Predict("s0", args).status(), StatusIs(Code::kNotFound));
}

TEST_F(IndexerProcessTest, BadInputGetsPreciseStatusesAndTheServerStaysUp) {
  auto ix = Start("fm-indexer", {"--indexer_max_bytes", "1MiB"});
  ASSERT_NE(ix, nullptr);
  auto client = IndexerClient::Connect(ix->target());
  ASSERT_THAT(client, IsOk());
  ASSERT_THAT((*client)->Register("good", spec_, keys_.data(), chunks_, 3000), IsOk());
  auto channel = grpc::CreateChannel(ix->target(), grpc::InsecureChannelCredentials());
  auto stub = v1::Indexer::NewStub(channel);
  auto call = [&](auto fn) {
    grpc::ClientContext ctx;
    return FromGrpcStatus(fn(&ctx));
  };
  // Keys of the wrong width.
  v1::RegisterSessionRequest reg;
  reg.set_session_id("bad");
  SpecToProto(spec_, reg.mutable_spec());
  reg.mutable_keys()->set_chunks(2);
  reg.mutable_keys()->set_data(std::string(2 * 60, '\0'));
  reg.set_tokens(64);
  v1::RegisterSessionResponse rr;
  auto st = call([&](grpc::ClientContext* c) { return stub->RegisterSession(c, reg, &rr); });
  EXPECT_THAT(st, StatusIs(Code::kInvalidArgument));
  EXPECT_NE(st.message().find("expected [1][2][68] = 136"), std::string::npos) << st;
  // A spec that is not one.
  reg.mutable_spec()->set_head_dim(33);
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->RegisterSession(c, reg, &rr); }),
              StatusIs(Code::kInvalidArgument));
  v1::PredictRequest pr;
  v1::PredictResponse presp;
  pr.set_session_id("missing");
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kNotFound));
  pr.set_session_id("good");
  pr.set_budget(2.0f);
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kInvalidArgument));
  pr.set_budget(0.1f);
  pr.set_max_pages(1000);
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kInvalidArgument));
  pr.set_max_pages(0);
  pr.set_policy(static_cast<v1::Policy>(99));
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kInvalidArgument));
  pr.set_policy(v1::POLICY_LSA);
  pr.set_hidden(std::string(10, '\0'));  // not whole floats
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kInvalidArgument));
  pr.set_hidden(std::string(spec_.hidden_dim * 4, '\0'));
  EXPECT_THAT(call([&](grpc::ClientContext* c) { return stub->Predict(c, pr, &presp); }),
              StatusIs(Code::kFailedPrecondition));  // no weights loaded
  EXPECT_THAT((*client)->LoadWeights(dir_ + "/none.safetensors").status(),
              StatusIs(Code::kNotFound));
  EXPECT_THAT((*client)->Append("good", spec_, keys_.data(), 3, 1, 3000),
              StatusIs(Code::kFailedPrecondition));
  // Over the memory limit: 1 MiB holds 20 such sessions, not 40.
  absl::Status last;
  for (int i = 0; i < 40 && last.ok(); ++i)
    last = (*client)->Register("fill" + std::to_string(i), spec_, keys_.data(), chunks_, 3000);
  EXPECT_THAT(last, StatusIs(Code::kResourceExhausted));
  // Still serving, and the good session is intact.
  PredictArgs args;
  args.policy = Policy::kSinkRecency;
  auto p = (*client)->Predict("good", args);
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(Pages(*p), (std::vector<uint64_t>{0, 43, 44, 45, 46}));
  {
    auto health = grpc::health::v1::Health::NewStub(channel);
    grpc::health::v1::HealthCheckRequest hreq;
    grpc::health::v1::HealthCheckResponse hresp;
    grpc::ClientContext hctx;
    ASSERT_TRUE(health->Check(&hctx, hreq, &hresp).ok());
    EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  // SIGTERM drains and exits cleanly (clients gone, so no connection holds the drain).
  stub.reset();
  channel.reset();
  client->reset();
  EXPECT_EQ(ix->Stop(SIGTERM), 0);
}

// fmctl load-weights loads a weights file on the indexer (here the all-in-one's) and prints
// its hash; a missing file fails with the indexer's NOT_FOUND and a non-zero exit.
TEST_F(IndexerProcessTest, FmctlLoadsWeightsIntoARunningIndexer) {
  auto server = Start("flashmemory", {"--data_dir", dir_ + "/data", "--ram_bytes", "64MiB",
                                      "--slab_bytes", "8MiB"});
  ASSERT_NE(server, nullptr);
  const std::string w = SaveWeights();
  auto run = [&](const std::string& file, int* status) {
    const std::string cmd = BinDir() + "/fmctl load-weights --target " + server->target() + " " +
                            file + " 2>&1";
    FILE* f = popen(cmd.c_str(), "r");
    std::string out;
    char buf[512];
    while (f && fgets(buf, sizeof(buf), f)) out += buf;
    *status = f ? pclose(f) : -1;
    return out;
  };
  int status = -1;
  const std::string out = run(w, &status);
  EXPECT_EQ(status, 0) << out;
  auto loaded = Weights::Load(w);
  ASSERT_THAT(loaded, IsOk());
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>((*loaded)->hash));
  EXPECT_EQ(out, "loaded " + w + " on 1 indexer replica(s): weights hash " + hex + "\n");
  auto ix = IndexerClient::Connect(server->target());
  ASSERT_THAT(ix, IsOk());
  auto st = (*ix)->Stats(0);
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->weights_hash(), (*loaded)->hash);
  const std::string bad = run(dir_ + "/none.safetensors", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(bad.find("NOT_FOUND"), std::string::npos) << bad;
  EXPECT_TRUE(server->Alive());
}

TEST_F(IndexerProcessTest, AllInOneServesKvstoreAndIndexerOnOnePort) {
  auto server =
      Start("flashmemory", {"--data_dir", dir_ + "/data", "--ram_bytes", "64MiB", "--slab_bytes",
                            "8MiB", "--weights", SaveWeights(), "--metrics_port", "0"});
  ASSERT_NE(server, nullptr);
  auto ix = IndexerClient::Connect(server->target());
  ASSERT_THAT(ix, IsOk());
  ASSERT_THAT((*ix)->Register("s", spec_, keys_.data(), chunks_, 3000), IsOk());
  PredictArgs args;  // default policy: lsa, weights loaded at start
  args.hidden.assign(session_->hidden(0), session_->hidden(0) + spec_.hidden_dim);
  auto p = (*ix)->Predict("s", args);
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(p->chunks_scored, chunks_);
  {  // The indexer's totals on /metrics.
    httplib::Client http("127.0.0.1", server->metrics_port());
    auto res = http.Get("/metrics");
    ASSERT_TRUE(res);
    EXPECT_NE(res->body.find("fm_indexer_sessions 1\n"), std::string::npos) << res->body;
    EXPECT_NE(res->body.find("fm_indexer_predictions_total 1\n"), std::string::npos);
    EXPECT_NE(res->body.find("fm_indexer_chunks " + std::to_string(chunks_) + "\n"),
              std::string::npos);
  }
  KvClientOptions o;
  o.use_ucx = false;
  auto kv = KvClient::Connect(server->target(), o);
  ASSERT_THAT(kv, IsOk());
  std::vector<uint8_t> page(spec_.PageBytes());
  session_->FillPage(3, page.data());
  auto h = MakePageHeader("s", 3, ModelSpecHash(spec_), 64, spec_.dtype, page.data(), page.size());
  ASSERT_THAT((*kv)->Put(h, page.data()), IsOk());
  auto got = (*kv)->Get({PageRef{"s", 3}});
  ASSERT_THAT(got, IsOk());
  ASSERT_EQ(got->size(), 1u);
  EXPECT_EQ((*got)[0].payload, std::string(reinterpret_cast<char*>(page.data()), page.size()));
}

}  // namespace
}  // namespace fm::indexer
