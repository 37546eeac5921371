#include "services/kvstore/kv_client.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "common/grpc_server.h"
#include "common/status_matchers.h"
#include "services/kvstore/kvstore_service.h"

namespace fm {
namespace {
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;

TEST(Rendezvous, StableAndBalancedAndMinimalMovement) {
  std::vector<std::string> three = {"a:1", "b:1", "c:1"};
  std::vector<std::string> four = {"a:1", "b:1", "c:1", "d:1"};
  std::map<size_t, int> counts;
  int moved = 0, moved_elsewhere = 0;
  for (uint64_t p = 0; p < 3000; ++p) {
    size_t r3 = RendezvousPick(three, "sess", p);
    EXPECT_EQ(r3, RendezvousPick(three, "sess", p));
    ++counts[r3];
    size_t r4 = RendezvousPick(four, "sess", p);
    if (four[r4] != three[r3]) {
      ++moved;
      if (four[r4] != "d:1") ++moved_elsewhere;
    }
  }
  for (auto& [r, n] : counts) EXPECT_GT(n, 800) << r;
  EXPECT_EQ(moved_elsewhere, 0);  // adding d only moves pages onto d
  EXPECT_GT(moved, 500);
  EXPECT_LT(moved, 1000);
}

TEST(ResolveReplicas, StaticAndDns) {
  EXPECT_EQ(ResolveReplicas("b:2,a:1,,a:1").value(), (std::vector<std::string>{"a:1", "b:2"}));
  auto dns = ResolveReplicas("dns:localhost:7000");
  ASSERT_THAT(dns, IsOk());
  EXPECT_FALSE(dns->empty());
  EXPECT_THAT(ResolveReplicas(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ResolveReplicas("dns:nohost"), StatusIs(absl::StatusCode::kInvalidArgument));
}

// An in-process server: the service over gRPC plus the UCX data path.
TEST(KvClient, GrpcAndUcxPathsAgree) {
  auto dir = std::filesystem::temp_directory_path() / ("fm_kvc_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  KvStoreOptions kv;
  kv.db_path = dir.string();
  kv.ram_bytes = 8 << 20;
  kv.slab_bytes = 1 << 20;
  auto store = KvStore::Open(kv, nullptr);
  ASSERT_THAT(store, IsOk());
  KvStoreService service(store->get());
  ServerOptions so;
  so.host = "127.0.0.1";
  so.port = 0;
  GrpcServerRunner runner(so, nullptr);
  runner.AddService(&service, "flashmemory.v1.KvStore");
  ASSERT_THAT(runner.Start(), IsOk());
  std::string target = "127.0.0.1:" + std::to_string(runner.port());

  auto client = KvClient::Connect(target, KvClientOptions{});
  ASSERT_THAT(client, IsOk());
  ASSERT_TRUE((*client)->has_ucx());
  std::vector<std::string> payloads;
  for (uint64_t i = 0; i < 6; ++i) {
    std::string p(100000 + i * 1000, static_cast<char>('a' + i));
    p[i] = 'Z';
    payloads.push_back(p);
    auto h = MakePageHeader("s", i, 1, 64, DType::kBf16, p.data(), p.size());
    if (i % 2)
      ASSERT_THAT((*client)->PutUcx(h, p.data()), IsOk());
    else
      ASSERT_THAT((*client)->Put(h, p.data()), IsOk());
  }
  std::vector<PageRef> keys;
  for (uint64_t i = 0; i < 6; ++i) keys.push_back({"s", 5 - i});
  auto via_grpc = (*client)->Get(keys);
  auto via_ucx = (*client)->Read(keys);
  ASSERT_THAT(via_grpc, IsOk());
  ASSERT_THAT(via_ucx, IsOk());
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ((*via_grpc)[i].payload, payloads[keys[i].page]);
    EXPECT_EQ((*via_ucx)[i].payload, payloads[keys[i].page]);
    EXPECT_EQ((*via_ucx)[i].header.page, keys[i].page);
  }
  EXPECT_THAT((*client)->Get({{"s", 99}}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT((*client)->Read({{"s", 99}}), StatusIs(absl::StatusCode::kNotFound));
  auto stats = (*client)->Stats("s");
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->sessions(0).pages(), 6u);
  EXPECT_EQ(stats->active_leases(), 0u);

  // Straight into a mapped region at given offsets (the decode worker's cells): over UCX,
  // and over gRPC from a client without UCX; a record larger than its room is DATA_LOSS.
  for (bool ucx : {true, false}) {
    SCOPED_TRACE(ucx ? "ucx" : "grpc");
    KvClientOptions ko;
    ko.use_ucx = ucx;
    auto sharded = ShardedKvClient::Connect({target}, ko);
    ASSERT_THAT(sharded, IsOk());
    auto engine = ucx ? nullptr : UcxEngine::Create(false);
    UcxEngine* e = ucx ? (*sharded)->engine() : engine->get();
    ASSERT_NE(e, nullptr);
    auto region = e->MapRegion(1 << 20);
    ASSERT_THAT(region, IsOk());
    const uint64_t room = 120000;
    std::vector<uint64_t> offsets;
    for (size_t i = 0; i < keys.size(); ++i) offsets.push_back((keys.size() - 1 - i) * room);
    std::vector<PageHeaderData> headers;
    ASSERT_THAT((*sharded)->ReadInto(keys, **region, offsets, room, &headers), IsOk());
    for (size_t i = 0; i < keys.size(); ++i) {
      const std::string& want = payloads[keys[i].page];
      EXPECT_EQ(headers[i].page, keys[i].page);
      EXPECT_EQ(headers[i].payload_bytes, want.size());
      EXPECT_EQ(std::memcmp((*region)->data() + offsets[i] + kPageHeaderBytes, want.data(),
                            want.size()),
                0);
      PageHeaderData h;
      ASSERT_THAT(DecodePageHeader((*region)->data() + offsets[i], &h), IsOk());
      EXPECT_EQ(h.page, keys[i].page);
    }
    EXPECT_THAT((*sharded)->ReadInto(keys, **region, offsets, 100000, nullptr),
                StatusIs(absl::StatusCode::kDataLoss));
    EXPECT_THAT((*sharded)->ReadInto(keys, **region, {0}, room, nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  stats = (*client)->Stats("s");
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->active_leases(), 0u);  // the refused read ended its lease
  client->reset();
  runner.Shutdown();
  store->reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fm
