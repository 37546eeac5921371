// Integration tests: the real fm-kvstore binary as a separate process on loopback.
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "common/checksum.h"
#include "common/status.h"
#include "common/status_matchers.h"
#include "flashmemory/v1/kvstore.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/kvstore/kv_client.h"
#include "services/kvstore/kvstore_service.h"
#include "tests/process_util.h"

namespace fm {
namespace {
namespace v1 = flashmemory::v1;
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;
using Code = absl::StatusCode;

PageHeaderData Header(const std::string& sid, uint64_t page, const std::string& p) {
  return MakePageHeader(sid, page, 1234, 64, DType::kBf16, p.data(), p.size());
}

class KvStoreProcessTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("fm_kvit"); }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<ServerProcess> StartKv(std::vector<std::string> extra,
                                         const std::string& db = "db") {
    std::vector<std::string> args = {"--db", dir_ + "/" + db, "--metrics_port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = ServerProcess::Start("fm-kvstore", args);
    EXPECT_THAT(p, IsOk());
    return p.ok() ? std::move(*p) : nullptr;
  }
  std::string dir_;
};

TEST_F(KvStoreProcessTest, PutGetOverGrpcAndUcxWithHealthAndMetrics) {
  auto kv = StartKv({"--ram_bytes", "64MiB", "--slab_bytes", "8MiB"});
  ASSERT_NE(kv, nullptr);
  auto client = KvClient::Connect(kv->target(), KvClientOptions{});
  ASSERT_THAT(client, IsOk());
  ASSERT_TRUE((*client)->has_ucx());
  std::vector<std::string> payloads;
  for (uint64_t i = 0; i < 16; ++i) {
    payloads.push_back(RandomBytes(256 << 10, i));
    auto h = Header("sess", i, payloads[i]);
    ASSERT_THAT(
        i % 2 ? (*client)->PutUcx(h, payloads[i].data()) : (*client)->Put(h, payloads[i].data()),
        IsOk());
  }
  std::vector<PageRef> keys;
  for (uint64_t i = 0; i < 16; ++i) keys.push_back({"sess", i});
  auto g = (*client)->Get(keys);
  auto u = (*client)->Read(keys);
  ASSERT_THAT(g, IsOk());
  ASSERT_THAT(u, IsOk());
  for (uint64_t i = 0; i < 16; ++i) {
    EXPECT_EQ((*g)[i].payload, payloads[i]) << i;
    EXPECT_EQ((*u)[i].payload, payloads[i]) << i;
    EXPECT_EQ((*u)[i].header.spec_hash, 1234u);
  }
  {  // Standard health service.
    auto channel = grpc::CreateChannel(kv->target(), grpc::InsecureChannelCredentials());
    auto health = grpc::health::v1::Health::NewStub(channel);
    for (const char* svc : {"", "flashmemory.v1.KvStore"}) {
      grpc::ClientContext ctx;
      grpc::health::v1::HealthCheckRequest req;
      req.set_service(svc);
      grpc::health::v1::HealthCheckResponse resp;
      ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
      EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
    }
  }
  {  // Prometheus metrics.
    httplib::Client http("127.0.0.1", kv->metrics_port());
    auto res = http.Get("/metrics");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    EXPECT_NE(res->body.find("fm_kvstore_puts_total 16"), std::string::npos) << res->body;
    EXPECT_NE(res->body.find("fm_kvstore_session_pages{session=\"sess\"} 16"), std::string::npos);
  }
  // SIGTERM drains and exits cleanly.
  client->reset();
  int status = kv->Stop(SIGTERM);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// Server reflection lists the services (raw bytes over a generic call: the reflection protos
// are compiled into libgrpc++_reflection, not into this test).
TEST_F(KvStoreProcessTest, ServesReflection) {
  auto kv = StartKv({"--ram_bytes", "16MiB", "--slab_bytes", "4MiB"});
  ASSERT_NE(kv, nullptr);
  auto channel = grpc::CreateChannel(kv->target(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok = false;
  auto step = [&](int want) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(tag, reinterpret_cast<void*>(want));
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  const std::string list_services("\x3a\x00", 2);  // ServerReflectionRequest{list_services: ""}
  grpc::Slice slice(list_services);
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  call->WritesDone(reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(4));
  ASSERT_TRUE(step(4));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const auto& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  EXPECT_NE(bytes.find("flashmemory.v1.KvStore"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(KvStoreProcessTest, RamBudgetSmallerThanDataSpillsAndReadsBack) {
  auto kv = StartKv({"--ram_bytes", "2MiB", "--slab_bytes", "1MiB"});
  ASSERT_NE(kv, nullptr);
  auto client = KvClient::Connect(kv->target(), KvClientOptions{}).value();
  const int n = 24;  // 24 x 256 KiB = 6 MiB of pages over a 2 MiB RAM tier
  for (int i = 0; i < n; ++i) {
    std::string p = RandomBytes(256 << 10, 100 + i);
    ASSERT_THAT(client->Put(Header("big", i, p), p.data()), IsOk());
  }
  auto st = client->Stats("big").value();
  EXPECT_EQ(st.rocksdb().pages(), static_cast<uint64_t>(n));
  EXPECT_LE(st.ram().bytes(), 2u << 20);
  EXPECT_GT(st.evictions(), 0u);
  for (int i = 0; i < n; ++i) {
    auto viaucx = client->Read({{"big", static_cast<uint64_t>(i)}});
    ASSERT_THAT(viaucx, IsOk());
    EXPECT_EQ((*viaucx)[0].payload, RandomBytes(256 << 10, 100 + i));
    auto viagrpc = client->Get({{"big", static_cast<uint64_t>(n - 1 - i)}});
    ASSERT_THAT(viagrpc, IsOk());
    EXPECT_EQ((*viagrpc)[0].payload, RandomBytes(256 << 10, 100 + n - 1 - i));
  }
  st = client->Stats("big").value();
  EXPECT_GT(st.spill_reads(), 0u);
  EXPECT_EQ(st.sessions(0).misses(), st.misses());
}

TEST_F(KvStoreProcessTest, KillDashNineLosesNothingAcknowledged) {
  auto kv = StartKv({"--ram_bytes", "4MiB", "--slab_bytes", "1MiB"});
  ASSERT_NE(kv, nullptr);
  const int n = 40;
  {
    auto client = KvClient::Connect(kv->target(), KvClientOptions{}).value();
    for (int i = 0; i < n; ++i) {
      std::string p = RandomBytes(64 << 10, 1000 + i);
      // Half through each data path; every OK is an acknowledgement.
      ASSERT_THAT(i % 2 ? client->PutUcx(Header("durable", i, p), p.data())
                        : client->Put(Header("durable", i, p), p.data()),
                  IsOk());
    }
  }
  int status = kv->Stop(SIGKILL);
  ASSERT_TRUE(WIFSIGNALED(status));
  kv = StartKv({"--ram_bytes", "4MiB", "--slab_bytes", "1MiB"});
  ASSERT_NE(kv, nullptr);
  auto client = KvClient::Connect(kv->target(), KvClientOptions{}).value();
  auto st = client->Stats("durable").value();
  EXPECT_EQ(st.sessions(0).pages(), static_cast<uint64_t>(n));
  std::vector<PageRef> keys;
  for (int i = 0; i < n; ++i) keys.push_back({"durable", static_cast<uint64_t>(i)});
  auto got = client->Read(keys);
  ASSERT_THAT(got, IsOk());
  for (int i = 0; i < n; ++i) EXPECT_EQ((*got)[i].payload, RandomBytes(64 << 10, 1000 + i)) << i;
}

TEST_F(KvStoreProcessTest, TwoReplicasWithTheShardingClient) {
  auto a = StartKv({"--ram_bytes", "16MiB", "--slab_bytes", "4MiB"}, "a");
  auto b = StartKv({"--ram_bytes", "16MiB", "--slab_bytes", "4MiB"}, "b");
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  auto replicas = ResolveReplicas(a->target() + "," + b->target()).value();
  auto sharded = ShardedKvClient::Connect(replicas, KvClientOptions{});
  ASSERT_THAT(sharded, IsOk());
  const int n = 64;
  std::vector<PageRef> keys;
  for (int i = 0; i < n; ++i) {
    std::string p = RandomBytes(32 << 10, 5000 + i);
    ASSERT_THAT((*sharded)->Put(Header("spread", i, p), p.data()), IsOk());
    keys.push_back({"spread", static_cast<uint64_t>(i)});
  }
  uint64_t total = 0;
  for (size_t r = 0; r < 2; ++r) {
    auto st = (*sharded)->replica(r)->Stats("*").value();
    uint64_t pages = st.rocksdb().pages();
    EXPECT_GT(pages, 16u) << "replica " << r;  // both hold a fair share
    total += pages;
  }
  EXPECT_EQ(total, static_cast<uint64_t>(n));
  // Each page lives exactly where rendezvous hashing says.
  for (int i = 0; i < n; ++i) {
    size_t r = (*sharded)->ReplicaFor("spread", i);
    EXPECT_THAT((*sharded)->replica(r)->Get({keys[i]}), IsOk());
    EXPECT_THAT((*sharded)->replica(1 - r)->Get({keys[i]}), StatusIs(Code::kNotFound));
  }
  auto got = (*sharded)->Read(keys);
  ASSERT_THAT(got, IsOk());
  for (int i = 0; i < n; ++i) EXPECT_EQ((*got)[i].payload, RandomBytes(32 << 10, 5000 + i));
  EXPECT_EQ((*sharded)->DeleteSession("spread").value(), static_cast<uint64_t>(n));
  EXPECT_THAT((*sharded)->DeleteSession("spread"), StatusIs(Code::kNotFound));
}

TEST_F(KvStoreProcessTest, AClientGoneWithAReleaseInFlightTakesNothingDown) {
  // Each UCX read ends its lease with an asynchronous Release; a client that goes at once
  // waits for it, so the channel never goes from a gRPC callback thread.
  auto kv = StartKv({"--ram_bytes", "16MiB", "--slab_bytes", "8MiB"});
  ASSERT_NE(kv, nullptr);
  const std::string p = RandomBytes(64 << 10, 7);
  for (int i = 0; i < 40; ++i) {
    auto client = KvClient::Connect(kv->target(), KvClientOptions{});
    ASSERT_THAT(client, IsOk());
    if (i == 0) {
      ASSERT_THAT((*client)->Put(Header("s", 0, p), p.data()), IsOk());
    }
    auto r = (*client)->Read({{"s", 0}});
    ASSERT_THAT(r, IsOk());
    EXPECT_EQ((*r)[0].payload, p);
  }
  EXPECT_TRUE(kv->Alive());
}

TEST_F(KvStoreProcessTest, BadInputGetsPreciseStatusAndDisturbsNothing) {
  auto kv = StartKv({"--ram_bytes", "1MiB", "--slab_bytes", "1MiB", "--max_session_bytes", "250KiB",
                     "--max_page_bytes", "256KiB", "--max_message_bytes", "1MiB"});
  ASSERT_NE(kv, nullptr);
  auto client = KvClient::Connect(kv->target(), KvClientOptions{}).value();
  std::string good = RandomBytes(100 << 10, 1);
  ASSERT_THAT(client->Put(Header("victim", 0, good), good.data()), IsOk());
  auto* stub = client->stub();
  auto put = [&](v1::PutPageRequest req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::PutPageResponse resp;
    return FromGrpcStatus(stub->PutPage(&ctx, req, &resp));
  };
  auto request = [&](const std::string& sid, uint64_t page, const std::string& p) {
    v1::PutPageRequest req;
    HeaderToProto(Header(sid, page, p), req.mutable_header());
    req.set_payload(p);
    return req;
  };
  EXPECT_THAT(put(v1::PutPageRequest()), StatusIs(Code::kInvalidArgument, "header"));
  EXPECT_THAT(put(request("", 0, good)), StatusIs(Code::kInvalidArgument, "session_id"));
  EXPECT_THAT(put(request(std::string(200, 's'), 0, good)),
              StatusIs(Code::kInvalidArgument, "128"));
  auto short_payload = request("x", 0, good);
  short_payload.mutable_payload()->pop_back();
  EXPECT_THAT(put(short_payload), StatusIs(Code::kInvalidArgument, "header says"));
  auto corrupt = request("x", 0, good);
  (*corrupt.mutable_payload())[77] ^= 1;
  EXPECT_THAT(put(corrupt), StatusIs(Code::kDataLoss, "checksum"));
  std::string big = RandomBytes(300 << 10, 2);
  EXPECT_THAT(put(request("x", 0, big)), StatusIs(Code::kResourceExhausted, "limit"));
  std::string huge = RandomBytes(2 << 20, 3);
  EXPECT_THAT(put(request("x", 0, huge)),
              StatusIs(Code::kResourceExhausted));  // over the message limit
  ASSERT_THAT(client->Put(Header("x", 0, good), good.data()), IsOk());
  ASSERT_THAT(client->Put(Header("x", 1, good), good.data()), IsOk());
  EXPECT_THAT(client->Put(Header("x", 2, good), good.data()),
              StatusIs(Code::kResourceExhausted, "session"));
  // Unknown session, page and lease.
  EXPECT_THAT(client->Get({{"nobody", 0}}), StatusIs(Code::kNotFound, "unknown session"));
  EXPECT_THAT(client->Get({{"x", 9}}), StatusIs(Code::kNotFound, "page 9"));
  EXPECT_THAT(client->Read({{"x", 9}}), StatusIs(Code::kNotFound));
  EXPECT_THAT(client->Release(999), StatusIs(Code::kNotFound));
  EXPECT_THAT(client->Stats("nobody"), StatusIs(Code::kNotFound));
  // An expired put grant cannot be committed.
  {
    v1::GrantPutRequest req;
    HeaderToProto(Header("x", 1, good), req.mutable_header());
    req.set_lease_ms(1);
    v1::GrantPutResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->GrantPut(&ctx, req, &resp).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    v1::CommitPutRequest commit;
    commit.set_lease_id(resp.lease_id());
    v1::CommitPutResponse cresp;
    grpc::ClientContext ctx2;
    EXPECT_THAT(FromGrpcStatus(stub->CommitPut(&ctx2, commit, &cresp)),
                StatusIs(Code::kNotFound, "expired"));
  }
  // A stale location of a deleted page, reused by another session's page, is caught by the
  // reader's verification: another session's bytes are never accepted as this page.
  {
    v1::ResolveRequest req;
    auto* k = req.add_keys();
    k->set_session_id("x");
    k->set_page(0);
    v1::ResolveResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Resolve(&ctx, req, &resp).ok());
    ASSERT_THAT(client->Release(resp.lease_id()), IsOk());
    ASSERT_EQ(client->DeleteSession("x").value(), 2u);
    EXPECT_THAT(client->Get({{"x", 0}}), StatusIs(Code::kNotFound));
    for (uint64_t i = 0; i < 12; ++i) {  // fill the RAM tier so the old cell is reused
      std::string p = RandomBytes(100 << 10, 50 + i);
      ASSERT_THAT(client->Put(Header("intruder" + std::to_string(i), 0, p), p.data()), IsOk());
    }
    v1::ConnectRequest creq;
    creq.set_worker_address(client->engine()->worker_address());
    v1::ConnectResponse cresp;
    grpc::ClientContext cctx;
    ASSERT_TRUE(stub->Connect(&cctx, creq, &cresp).ok());
    auto peer = UcxPeer::Connect(client->engine(), cresp.worker_address(), cresp.rkey());
    ASSERT_THAT(peer, IsOk());
    auto buf = client->engine()->MapRegion(1 << 20).value();
    const auto& loc = resp.locations(0);
    ASSERT_THAT((*peer)->Get({UcxPeer::Op{loc.remote_address(), buf->data(), loc.length()}}, *buf),
                IsOk());
    EXPECT_THAT(VerifyPageRecord(buf->data(), loc.length(), "x", 0), StatusIs(Code::kDataLoss));
  }
  // The server is alive and the other session is intact.
  EXPECT_TRUE(kv->Alive());
  auto v = client->Read({{"victim", 0}});
  ASSERT_THAT(v, IsOk());
  EXPECT_EQ((*v)[0].payload, good);
}

}  // namespace
}  // namespace fm
