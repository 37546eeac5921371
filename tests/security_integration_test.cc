// The cluster's security rules, on real fm-kvstore, fm-indexer and fm-decode processes
// behind mTLS with a tokens file (certificates from scripts/make_dev_certs.sh): who can
// connect, who may call what, and that tenants cannot see each other's sessions.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "common/status_matchers.h"
#include "services/decode/decode_client.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"
#include "tools/replay/replay.h"

namespace fm {
namespace {
namespace v1 = flashmemory::v1;
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;
using Code = absl::StatusCode;

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("fm_sec");
    const std::string cmd = std::string("bash ") + FM_SOURCE_DIR +
                            "/scripts/make_dev_certs.sh " + dir_ + " > /dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    std::ofstream(dir_ + "/tokens") << "# token name role\n"
                                       "tok-a alice\n"
                                       "tok-b bob tenant\n"
                                       "tok-svc decode-pool service\n";
    workload::SessionConfig c;
    c.spec = *PresetSpec("tiny");
    c.knobs.tau = 16;
    c.seed = 21;
    c.prefill_tokens = 4000;
    c.steps = 16;
    g_ = *workload::Session::Generate(c);
    prefill_ = replay::MakePrefill(*g_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::vector<std::string> ServerTls() const {
    return {"--tls_cert", dir_ + "/service.pem", "--tls_key", dir_ + "/service.key",
            "--tls_ca",   dir_ + "/ca.pem",      "--tokens_file", dir_ + "/tokens"};
  }
  // A tenant client: the CA, the client certificate, a token.
  ClientSecurity Tenant(const std::string& token, bool cert = true) const {
    ClientSecurity s;
    s.tls.ca = dir_ + "/ca.pem";
    if (cert) {
      s.tls.cert = dir_ + "/client.pem";
      s.tls.key = dir_ + "/client.key";
    }
    s.token = token;
    return s;
  }
  std::unique_ptr<ServerProcess> Start(const std::string& bin, std::vector<std::string> args) {
    auto p = ServerProcess::Start(bin, std::move(args));
    EXPECT_THAT(p, IsOk());
    return p.ok() ? std::move(*p) : nullptr;
  }
  absl::Status OpenQuest(decode::DecodeClient& c, const std::string& id) {
    replay::ReplayOptions o;
    o.session_id = id;
    o.budget = 0.25f;
    o.policy = indexer::Policy::kQuest;
    replay::ReplayResult unused;
    return replay::OpenAndPrefill(c, *g_, prefill_, o, &unused);
  }
  // The code of one whole step of session `id` (its outputs in *out when given).
  int Step(decode::DecodeClient& c, const std::string& id, uint32_t st) {
    replay::StepSource src(*g_, id, 16);
    auto stream = c.OpenStream();
    v1::DecodeBatch b;
    *b.add_requests() = src.Request(st, 0, g_->spec().layers);
    auto r = stream->Run(b);
    if (!r.ok()) return int(r.status().code());
    return r->results(0).code();
  }

  std::string dir_;
  std::unique_ptr<workload::Session> g_;
  replay::PrefillData prefill_;
};

TEST_F(SecurityTest, MtlsAndTokensKeepClientsOutAndTenantsApart) {
  std::vector<std::string> kv_args = ServerTls();
  kv_args.insert(kv_args.end(), {"--db", dir_ + "/kv", "--ram_bytes", "32MiB", "--slab_bytes",
                                 "4MiB"});
  auto kv = Start("fm-kvstore", kv_args);
  auto ix = Start("fm-indexer", ServerTls());
  ASSERT_TRUE(kv && ix);
  // The worker reaches both with the service certificate (common name fm-service).
  std::vector<std::string> dec_args = ServerTls();
  dec_args.insert(dec_args.end(), {"--kvstore", "localhost:" + std::to_string(kv->port()),
                                   "--indexer", "localhost:" + std::to_string(ix->port()),
                                   "--reserve_bytes", "64MiB"});
  auto dec = Start("fm-decode", dec_args);
  ASSERT_NE(dec, nullptr);
  const std::string target = "localhost:" + std::to_string(dec->port());
  decode::SessionOptions so;
  so.spec = g_->spec();
  so.mode = decode::Mode::kDense;
  so.max_tokens = 4016;

  // No TLS at all, TLS without a client certificate: the handshake fails.
  for (const ClientSecurity& s : {ClientSecurity{}, Tenant("tok-a", /*cert=*/false)}) {
    auto c = decode::DecodeClient::Connect(target, 5000, s);
    ASSERT_THAT(c, IsOk());
    EXPECT_THAT((*c)->Open("x", so).status(), StatusIs(Code::kUnavailable));
  }
  // A certificate but no token, or an unknown one; a service token opens no session.
  EXPECT_THAT((*decode::DecodeClient::Connect(target, 5000, Tenant("")))->Open("x", so).status(),
              StatusIs(Code::kUnauthenticated, "bearer token is required"));
  EXPECT_THAT(
      (*decode::DecodeClient::Connect(target, 5000, Tenant("tok-z")))->Open("x", so).status(),
      StatusIs(Code::kUnauthenticated, "unknown bearer token"));
  EXPECT_THAT(
      (*decode::DecodeClient::Connect(target, 5000, Tenant("tok-svc")))->Open("x", so).status(),
      StatusIs(Code::kPermissionDenied));

  // Alice's session "x" is hers: Bob gets NOT_FOUND for it on every RPC, as for an id
  // nobody uses, and may have an "x" of his own.
  auto alice = *decode::DecodeClient::Connect(target, 10000, Tenant("tok-a"));
  auto bob = *decode::DecodeClient::Connect(target, 10000, Tenant("tok-b"));
  ASSERT_THAT(OpenQuest(*alice, "x"), IsOk());
  ASSERT_EQ(Step(*alice, "x", 0), 0);
  EXPECT_THAT(bob->Stats("x").status(), StatusIs(Code::kNotFound));
  EXPECT_EQ(Step(*bob, "x", 1), int(Code::kNotFound));
  EXPECT_THAT(bob->Prefill("x", g_->spec(), prefill_.pages.data(), 1, 64, nullptr, 0),
              StatusIs(Code::kNotFound));
  EXPECT_THAT(bob->Close("x"), StatusIs(Code::kNotFound));
  EXPECT_THAT(bob->Close("x", /*delete_pages=*/true), StatusIs(Code::kNotFound));
  decode::SessionOptions resume;
  resume.resume = true;
  EXPECT_THAT(bob->Open("x", resume).status(), StatusIs(Code::kNotFound));
  ASSERT_THAT(OpenQuest(*bob, "x"), IsOk());
  ASSERT_THAT(bob->Close("x", true), IsOk());

  // The kvstore and the indexer serve the workers only: a tenant, with or without its
  // token, is refused; the service token is let in.
  for (const ClientSecurity& s : {Tenant("tok-a"), Tenant("")}) {
    KvClientOptions ko;
    ko.use_ucx = false;
    ko.security = s;
    auto kc = KvClient::Connect("localhost:" + std::to_string(kv->port()), ko);
    ASSERT_THAT(kc, IsOk());
    auto st = (*kc)->Stats("*");
    EXPECT_TRUE(st.status().code() == Code::kPermissionDenied ||
                st.status().code() == Code::kUnauthenticated)
        << st.status();
    EXPECT_FALSE((*kc)->DeleteSession("alice:x").ok());
    auto ic = indexer::IndexerClient::Connect("localhost:" + std::to_string(ix->port()), 5000, s);
    ASSERT_THAT(ic, IsOk());
    auto w = (*ic)->LoadWeights("/etc/passwd");
    EXPECT_TRUE(w.status().code() == Code::kPermissionDenied ||
                w.status().code() == Code::kUnauthenticated)
        << w.status();
    EXPECT_EQ(w.status().message().find("root"), std::string::npos);  // no file contents
  }
  {
    KvClientOptions ko;
    ko.use_ucx = false;
    ko.security = Tenant("tok-svc");
    auto kc = KvClient::Connect("localhost:" + std::to_string(kv->port()), ko);
    ASSERT_THAT(kc, IsOk());
    EXPECT_THAT((*kc)->Stats("alice:x"), IsOk());  // the worker keeps it under the scoped id
  }
  // Alice's session went on untouched.
  ASSERT_EQ(Step(*alice, "x", 1), 0);
  auto st = alice->Stats("x");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->steps(), 2u);
  ASSERT_THAT(alice->Close("x"), IsOk());
  EXPECT_TRUE(kv->Alive() && ix->Alive() && dec->Alive());
}

// LoadWeights reads only under --weights_dir (and without it, on a server with
// authentication, nothing), and its errors quote no file.
TEST_F(SecurityTest, WeightsComeFromTheWeightsDirOnly) {
  const std::string wd = dir_ + "/weights";
  std::filesystem::create_directories(wd);
  std::filesystem::copy_file(std::string(FM_SOURCE_DIR) + "/models/lsa-bench.safetensors",
                             wd + "/lsa-bench.safetensors");
  std::ofstream(wd + "/bad.safetensors") << "root:x:0:0:root:/root:/bin/bash\n";
  std::vector<std::string> args = ServerTls();
  auto closed = Start("fm-indexer", args);
  args.insert(args.end(), {"--weights_dir", wd});
  auto ix = Start("fm-indexer", args);
  ASSERT_TRUE(closed && ix);
  auto svc = [&](const ServerProcess& p) {
    return *indexer::IndexerClient::Connect("localhost:" + std::to_string(p.port()), 5000,
                                            Tenant("tok-svc"));
  };
  EXPECT_THAT(svc(*closed)->LoadWeights(wd + "/lsa-bench.safetensors").status(),
              StatusIs(Code::kFailedPrecondition, "--weights_dir"));
  auto c = svc(*ix);
  EXPECT_THAT(c->LoadWeights("lsa-bench.safetensors"), IsOk());
  EXPECT_THAT(c->LoadWeights(wd + "/lsa-bench.safetensors"), IsOk());
  for (const char* outside : {"/etc/passwd", "../tokens", "/tmp"})
    EXPECT_THAT(c->LoadWeights(outside).status(), StatusIs(Code::kPermissionDenied)) << outside;
  auto bad = c->LoadWeights("bad.safetensors");
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message().find("root"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("not a weights file"), std::string::npos) << bad.status();
}

TEST_F(SecurityTest, ANonLoopbackAddressWithoutTlsNeedsInsecure) {
  // Refused before it binds anything.
  auto p = ServerProcess::Start("fm-indexer", {"--host", "0.0.0.0"}, 10000);
  EXPECT_THAT(p.status(), StatusIs(Code::kInternal, "exited during start-up"));
  // Loopback needs nothing, TLS anywhere is fine (here on loopback).
  auto q = Start("fm-indexer", {});
  EXPECT_NE(q, nullptr);
  auto r = Start("fm-indexer", {"--tls_cert", dir_ + "/service.pem", "--tls_key",
                                dir_ + "/service.key"});
  EXPECT_NE(r, nullptr);
}

}  // namespace
}  // namespace fm
