#include "services/kvstore/kv_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "common/checksum.h"
#include "common/status.h"
#include "common/status_matchers.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"

namespace fm {
namespace {
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;
using Code = absl::StatusCode;

class KvStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("fm_kv_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    options_.db_path = dir_.string();
    options_.enable_ucx = false;
    options_.ram_bytes = 4 * kCell;  // four 64 KiB cells
    options_.slab_bytes = 4 * kCell;
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Open() { store_ = KvStore::Open(options_, nullptr).value(); }

  absl::Status PutPage(const std::string& sid, uint64_t page, const std::string& payload,
                       bool* in_ram = nullptr) {
    bool r;
    auto h = MakePageHeader(sid, page, 99, 64, DType::kBf16, payload.data(), payload.size());
    return store_->Put(h, reinterpret_cast<const uint8_t*>(payload.data()), payload.size(),
                       in_ram ? in_ram : &r);
  }
  absl::StatusOr<std::string> ReadPayload(const std::string& sid, uint64_t page,
                                          bool* spill = nullptr) {
    std::string out;
    bool s;
    absl::Status st = store_->Read(
        PageRef{sid, page},
        [&](const uint8_t* rec, size_t len) {
          out.assign(reinterpret_cast<const char*>(rec) + kPageHeaderBytes, len - kPageHeaderBytes);
        },
        spill ? spill : &s);
    if (!st.ok()) return st;
    return out;
  }

  static constexpr size_t kCell = 64 << 10;
  static constexpr size_t kPayload = kCell - kPageHeaderBytes;
  std::filesystem::path dir_;
  KvStoreOptions options_;
  std::unique_ptr<KvStore> store_;
};

TEST_F(KvStoreTest, PutThenReadIsBitExact) {
  Open();
  std::string p = RandomBytes(kPayload, 1);
  bool in_ram = false;
  ASSERT_THAT(PutPage("s", 0, p, &in_ram), IsOk());
  EXPECT_TRUE(in_ram);
  bool spill = true;
  EXPECT_EQ(ReadPayload("s", 0, &spill).value(), p);
  EXPECT_FALSE(spill);
  auto st = store_->Stats("s").value();
  EXPECT_EQ(st.hits, 1u);
  EXPECT_EQ(st.sessions[0].pages, 1u);
  EXPECT_EQ(st.sessions[0].bytes, kCell);
}

TEST_F(KvStoreTest, RamBudgetSmallerThanDataSpillsAndReadsBack) {
  Open();
  for (uint64_t i = 0; i < 12; ++i) ASSERT_THAT(PutPage("s", i, RandomBytes(kPayload, i)), IsOk());
  auto st = store_->Stats("").value();
  EXPECT_EQ(st.ram_pages, 4u);
  EXPECT_EQ(st.disk_pages, 12u);
  EXPECT_EQ(st.evictions, 8u);
  for (uint64_t i = 12; i-- > 0;) {  // newest first: the 4 cached pages are hits
    bool spill = false;
    ASSERT_EQ(ReadPayload("s", i, &spill).value(), RandomBytes(kPayload, i)) << i;
    EXPECT_EQ(spill, i < 8) << i;  // the oldest 8 were evicted
  }
  st = store_->Stats("").value();
  EXPECT_EQ(st.spill_reads, 8u);
  EXPECT_EQ(st.misses, 8u);
  EXPECT_EQ(st.hits, 4u);
}

TEST_F(KvStoreTest, ReopenServesEveryAcknowledgedPage) {
  Open();
  for (uint64_t i = 0; i < 6; ++i) ASSERT_THAT(PutPage("a", i, RandomBytes(1000 + i, i)), IsOk());
  ASSERT_THAT(PutPage("b", 3, RandomBytes(5000, 77)), IsOk());
  store_.reset();
  Open();
  auto st = store_->Stats("*").value();
  ASSERT_EQ(st.sessions.size(), 2u);
  EXPECT_EQ(st.disk_pages, 7u);
  for (uint64_t i = 0; i < 6; ++i) EXPECT_EQ(ReadPayload("a", i).value(), RandomBytes(1000 + i, i));
  EXPECT_EQ(ReadPayload("b", 3).value(), RandomBytes(5000, 77));
}

TEST_F(KvStoreTest, OverwriteReplacesAndKeepsAccounting) {
  Open();
  ASSERT_THAT(PutPage("s", 1, RandomBytes(1000, 1)), IsOk());
  ASSERT_THAT(PutPage("s", 1, RandomBytes(2000, 2)), IsOk());
  EXPECT_EQ(ReadPayload("s", 1).value(), RandomBytes(2000, 2));
  auto st = store_->Stats("s").value();
  EXPECT_EQ(st.sessions[0].pages, 1u);
  EXPECT_EQ(st.sessions[0].bytes, kPageHeaderBytes + 2000);
  EXPECT_EQ(st.ram_pages, 1u);
}

TEST_F(KvStoreTest, BadInputGetsPreciseStatus) {
  options_.max_session_bytes = 3 * kCell;
  options_.max_page_bytes = kPayload;
  options_.max_keys_per_call = 8;
  Open();
  std::string p = RandomBytes(kPayload, 5);
  EXPECT_THAT(PutPage("", 0, p), StatusIs(Code::kInvalidArgument, "session_id"));
  EXPECT_THAT(PutPage(std::string(129, 'x'), 0, p), StatusIs(Code::kInvalidArgument, "128"));
  EXPECT_THAT(PutPage("s", 0, RandomBytes(kPayload + 1, 5)),
              StatusIs(Code::kResourceExhausted, "limit"));
  // Length disagrees with the header.
  auto h = MakePageHeader("s", 0, 1, 64, DType::kBf16, p.data(), p.size());
  bool in_ram;
  EXPECT_THAT(store_->Put(h, reinterpret_cast<const uint8_t*>(p.data()), p.size() - 1, &in_ram),
              StatusIs(Code::kInvalidArgument, "header says"));
  // Checksum disagrees.
  h.checksum ^= 1;
  EXPECT_THAT(store_->Put(h, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &in_ram),
              StatusIs(Code::kDataLoss, "checksum"));
  h = MakePageHeader("s", 0, 1, 0, DType::kBf16, p.data(), p.size());
  EXPECT_THAT(store_->Put(h, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &in_ram),
              StatusIs(Code::kInvalidArgument, "token_count"));
  h = MakePageHeader("s", 0, 1, 1, static_cast<DType>(9), p.data(), p.size());
  EXPECT_THAT(store_->Put(h, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &in_ram),
              StatusIs(Code::kInvalidArgument, "dtype"));
  // Session byte limit: three pages fit, the fourth does not; overwriting one still does.
  for (uint64_t i = 0; i < 3; ++i) ASSERT_THAT(PutPage("s", i, p), IsOk());
  EXPECT_THAT(PutPage("s", 3, p), StatusIs(Code::kResourceExhausted, "limit"));
  EXPECT_THAT(PutPage("s", 2, p), IsOk());
  EXPECT_THAT(PutPage("other", 0, p), IsOk());  // the limit is per session
  // Unknowns.
  EXPECT_THAT(ReadPayload("nobody", 0), StatusIs(Code::kNotFound, "unknown session"));
  EXPECT_THAT(ReadPayload("s", 3), StatusIs(Code::kNotFound, "page 3"));
  EXPECT_THAT(store_->Release(12345), StatusIs(Code::kNotFound, "lease"));
  EXPECT_THAT(store_->CommitPut(12345), StatusIs(Code::kNotFound, "lease"));
  EXPECT_THAT(store_->DeleteSession("nobody"), StatusIs(Code::kNotFound));
  EXPECT_THAT(store_->Stats("nobody"), StatusIs(Code::kNotFound));
  EXPECT_THAT(store_->Acquire({}, 0), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(store_->Acquire(std::vector<PageRef>(9, PageRef{"s", 0}), 0),
              StatusIs(Code::kResourceExhausted));
  // Nothing above disturbed the stored pages.
  EXPECT_EQ(ReadPayload("s", 0).value(), p);
  EXPECT_EQ(store_->Stats("s").value().sessions[0].pages, 3u);
}

TEST_F(KvStoreTest, LeasesPinAndExpire) {
  options_.default_lease_ms = 60000;
  options_.max_pinned_bytes_per_client = options_.ram_bytes;  // one client pins it all here
  Open();
  for (uint64_t i = 0; i < 4; ++i) ASSERT_THAT(PutPage("s", i, RandomBytes(kPayload, i)), IsOk());
  auto lease = store_->Acquire({{"s", 0}, {"s", 1}, {"s", 2}, {"s", 3}}, 0);
  ASSERT_THAT(lease, IsOk());
  EXPECT_EQ(store_->Stats("").value().pinned_pages, 4u);
  // RAM is full of pinned pages: a put is still durable but not cached, and a lease on a
  // page that is not in RAM cannot be granted.
  bool in_ram = true;
  ASSERT_THAT(PutPage("s", 4, RandomBytes(kPayload, 4), &in_ram), IsOk());
  EXPECT_FALSE(in_ram);
  EXPECT_THAT(store_->Acquire({{"s", 4}}, 0), StatusIs(Code::kResourceExhausted, "pinned"));
  bool spill = false;
  EXPECT_EQ(ReadPayload("s", 4, &spill).value(), RandomBytes(kPayload, 4));  // served from RocksDB
  EXPECT_TRUE(spill);
  // The leased bytes are the page records.
  for (const auto& loc : lease->locations) {
    EXPECT_THAT(VerifyPageRecord(reinterpret_cast<const uint8_t*>(loc.address), loc.length, "s",
                                 loc.key.page),
                IsOk());
  }
  ASSERT_THAT(store_->Release(lease->id), IsOk());
  EXPECT_THAT(store_->Release(lease->id), StatusIs(Code::kNotFound));
  auto second = store_->Acquire({{"s", 4}}, 1);  // 1 ms
  ASSERT_THAT(second, IsOk());
  EXPECT_EQ(second->promoted, 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  store_->TEST_ExpireLeases();
  EXPECT_EQ(store_->Stats("").value().pinned_pages, 0u);
  EXPECT_THAT(store_->Release(second->id), StatusIs(Code::kNotFound, "expired"));
}

// No client can pin the whole RAM tier: each holds at most max_leases_per_client leases and
// max_pinned_bytes_per_client bytes (half the tier by default); ending a lease (release,
// expiry, commit) gives its share back; other clients are unaffected.
TEST_F(KvStoreTest, LeasesAreBoundedPerClient) {
  options_.max_leases_per_client = 2;
  Open();
  for (uint64_t i = 0; i < 4; ++i) ASSERT_THAT(PutPage("s", i, RandomBytes(kPayload, i)), IsOk());
  EXPECT_THAT(store_->Acquire({{"s", 0}, {"s", 1}, {"s", 2}}, 0, "a"),
              StatusIs(Code::kResourceExhausted, "its limit is"));  // 3 of 4 cells: > half
  auto l1 = store_->Acquire({{"s", 0}}, 0, "a");
  auto l2 = store_->Acquire({{"s", 1}}, 0, "a");
  ASSERT_THAT(l1, IsOk());
  ASSERT_THAT(l2, IsOk());
  EXPECT_THAT(store_->Acquire({{"s", 2}}, 0, "a"),
              StatusIs(Code::kResourceExhausted, "holds its limit of 2 leases"));
  auto other = store_->Acquire({{"s", 2}}, 0, "b");
  ASSERT_THAT(other, IsOk());
  const std::string payload = RandomBytes(kPayload, 9);
  auto h = MakePageHeader("s", 9, 99, 64, DType::kBf16, payload.data(), payload.size());
  EXPECT_THAT(store_->GrantPut(h, 0, "a").status(), StatusIs(Code::kResourceExhausted));
  ASSERT_THAT(store_->Release(l1->id), IsOk());
  auto grant = store_->GrantPut(h, 0, "a");
  ASSERT_THAT(grant, IsOk());
  EXPECT_FALSE(store_->CommitPut(grant->id).ok());  // nothing was written into the cell
  EXPECT_THAT(store_->Acquire({{"s", 3}}, 0, "a"), IsOk());  // the grant's share came back
}

TEST_F(KvStoreTest, GrantPutCommitsWhatWasWrittenAndRejectsForgeries) {
  Open();
  std::string p = RandomBytes(3000, 9);
  auto h = MakePageHeader("w", 7, 5, 64, DType::kFp16, p.data(), p.size());
  auto grant = store_->GrantPut(h, 0);
  ASSERT_THAT(grant, IsOk());
  auto* cell = reinterpret_cast<uint8_t*>(grant->locations[0].address);
  EXPECT_THAT(ReadPayload("w", 7), StatusIs(Code::kNotFound));  // invisible until committed
  EncodePageHeader(h, cell);
  std::memcpy(cell + kPageHeaderBytes, p.data(), p.size());
  ASSERT_THAT(store_->CommitPut(grant->id), IsOk());
  EXPECT_EQ(ReadPayload("w", 7).value(), p);
  EXPECT_THAT(store_->CommitPut(grant->id), StatusIs(Code::kNotFound));

  // A writer that puts another session's page into its grant is refused.
  auto h2 = MakePageHeader("w", 8, 5, 64, DType::kFp16, p.data(), p.size());
  grant = store_->GrantPut(h2, 0);
  ASSERT_THAT(grant, IsOk());
  cell = reinterpret_cast<uint8_t*>(grant->locations[0].address);
  auto forged = h2;
  forged.session_id = "victim";
  EncodePageHeader(forged, cell);
  std::memcpy(cell + kPageHeaderBytes, p.data(), p.size());
  EXPECT_THAT(store_->CommitPut(grant->id), StatusIs(Code::kDataLoss, "victim"));
  EXPECT_THAT(ReadPayload("w", 8), StatusIs(Code::kNotFound));
  EXPECT_THAT(ReadPayload("victim", 8), StatusIs(Code::kNotFound));
  // Corrupted payload.
  grant = store_->GrantPut(h2, 0);
  cell = reinterpret_cast<uint8_t*>(grant->locations[0].address);
  EncodePageHeader(h2, cell);
  std::memcpy(cell + kPageHeaderBytes, p.data(), p.size());
  cell[kPageHeaderBytes + 10] ^= 0xff;
  EXPECT_THAT(store_->CommitPut(grant->id), StatusIs(Code::kDataLoss, "checksum"));
  // An expired grant cannot be committed and releases its reservation.
  grant = store_->GrantPut(h2, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  store_->TEST_ExpireLeases();
  EXPECT_THAT(store_->CommitPut(grant->id), StatusIs(Code::kNotFound, "expired"));
  EXPECT_EQ(store_->Stats("w").value().sessions[0].pages, 1u);
}

TEST_F(KvStoreTest, DeleteSessionLeavesOthersIntact) {
  Open();
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_THAT(PutPage("gone", i, RandomBytes(100, i)), IsOk());
    ASSERT_THAT(PutPage("kept", i, RandomBytes(100, 10 + i)), IsOk());
  }
  auto lease = store_->Acquire({{"gone", 1}}, 0).value();
  EXPECT_EQ(store_->DeleteSession("gone").value(), 3u);
  EXPECT_THAT(ReadPayload("gone", 1), StatusIs(Code::kNotFound));
  EXPECT_THAT(store_->Release(lease.id), IsOk());
  for (uint64_t i = 0; i < 3; ++i)
    EXPECT_EQ(ReadPayload("kept", i).value(), RandomBytes(100, 10 + i));
  store_.reset();
  Open();  // the delete is durable too
  EXPECT_THAT(ReadPayload("gone", 0), StatusIs(Code::kNotFound));
  EXPECT_EQ(store_->Stats("*").value().sessions.size(), 1u);
}

}  // namespace
}  // namespace fm

namespace fm {
namespace {

// Concurrent puts of the same pages (both data paths) racing session deletes: afterwards the
// store's answers and what RocksDB recovers after a reopen agree page by page, so no slower
// write landed after a newer one and no deleted page came back.
// A closed session stays for a resume until its TTL, then goes; a write to it first (a
// resumed worker's) keeps it; the mark is durable, so a restarted store deletes it too.
TEST_F(KvStoreTest, ClosedSessionsGoAfterTheirTtlUnlessWrittenAgain) {
  options_.closed_session_ttl_s = 1;
  Open();
  const std::string payload = RandomBytes(1000, 3);
  for (const char* sid : {"a", "b"})
    for (uint64_t p = 0; p < 3; ++p) ASSERT_THAT(PutPage(sid, p, payload), IsOk());
  EXPECT_THAT(store_->CloseSession("nope"), StatusIs(Code::kNotFound));
  ASSERT_THAT(store_->CloseSession("a"), IsOk());
  ASSERT_THAT(store_->CloseSession("b"), IsOk());
  EXPECT_THAT(ReadPayload("a", 1), IsOk());  // kept for a resume meanwhile
  ASSERT_THAT(PutPage("b", 3, payload), IsOk());  // b is served again
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {  // within 10 s
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gone = absl::IsNotFound(store_->Stats("a").status());
  }
  EXPECT_TRUE(gone);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // past b's TTL too
  auto b = store_->Stats("b");
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->sessions[0].pages, 5u);  // 4 pages and its (cleared) close mark
  EXPECT_THAT(ReadPayload("b", 3), IsOk());

  // Closed under a long TTL, then reopened with a short one: the durable mark re-arms.
  store_.reset();
  options_.closed_session_ttl_s = 3600;
  Open();
  ASSERT_THAT(store_->CloseSession("b"), IsOk());
  store_.reset();
  options_.closed_session_ttl_s = 1;
  Open();
  gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gone = absl::IsNotFound(store_->Stats("b").status());
  }
  EXPECT_TRUE(gone);
}

// A claim makes the caller the session's owner: writes of an older epoch are refused with
// ABORTED and change nothing; unfenced writes (epoch 0) and the owner's go on; the epoch
// survives a restart.
TEST_F(KvStoreTest, ClaimsFenceWritesOfEarlierOwners) {
  Open();
  const std::string p1 = RandomBytes(1000, 1), p2 = RandomBytes(1000, 2);
  auto put = [&](uint64_t page, const std::string& payload, uint64_t epoch) {
    bool r;
    auto h = MakePageHeader("s", page, 99, 64, DType::kBf16, payload.data(), payload.size());
    h.epoch = epoch;
    return store_->Put(h, reinterpret_cast<const uint8_t*>(payload.data()), payload.size(), &r);
  };
  auto a = store_->ClaimSession("s");
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(*a, 1u);
  ASSERT_THAT(put(0, p1, *a), IsOk());
  auto b = store_->ClaimSession("s");  // another worker resumes it
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(*b, 2u);
  EXPECT_THAT(put(0, p2, *a), StatusIs(Code::kAborted, "moved to another worker"));
  EXPECT_THAT(put(1, p2, *a), StatusIs(Code::kAborted));
  EXPECT_EQ(*ReadPayload("s", 0), p1);  // nothing of the old owner's landed
  EXPECT_THAT(ReadPayload("s", 1), StatusIs(Code::kNotFound));
  auto grant = [&](uint64_t epoch) {
    auto h = MakePageHeader("s", 5, 99, 64, DType::kBf16, p2.data(), p2.size());
    h.epoch = epoch;
    return store_->GrantPut(h, 0);
  };
  EXPECT_THAT(grant(*a).status(), StatusIs(Code::kAborted));
  EXPECT_THAT(store_->CloseSession("s", *a), StatusIs(Code::kAborted));
  EXPECT_THAT(store_->DeleteSession("s", *a).status(), StatusIs(Code::kAborted));
  ASSERT_THAT(put(0, p2, *b), IsOk());
  ASSERT_THAT(put(1, p2, 0), IsOk());  // unfenced
  EXPECT_EQ(*ReadPayload("s", 0), p2);
  EXPECT_THAT(store_->ClaimSession("s", 7), IsOk());  // max(2 + 1, 7)
  store_.reset();
  Open();
  auto c = store_->ClaimSession("s");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(*c, 8u);  // the epoch record survived the restart
  EXPECT_THAT(put(0, p1, 7), StatusIs(Code::kAborted));
  EXPECT_THAT(store_->DeleteSession("s", *c), IsOk());
}

TEST_F(KvStoreTest, ConcurrentWritesAndDeletesAgreeWithTheDurableState) {
  options_.ram_bytes = 64 * kCell;
  options_.slab_bytes = 16 * kCell;
  Open();
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (int w = 0; w < 3; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < 150; ++i) {
        const uint64_t page = i % 6;
        std::string p = RandomBytes(4000 + 8 * w, w * 100000 + i);
        auto h = MakePageHeader("race", page, 1, 64, DType::kBf16, p.data(), p.size());
        if (w == 2) {  // the UCX-style path: grant, write into the cell, commit
          auto g = store_->GrantPut(h, 0);
          if (!g.ok()) continue;
          auto* cell = reinterpret_cast<uint8_t*>(g->locations[0].address);
          EncodePageHeader(h, cell);
          std::memcpy(cell + kPageHeaderBytes, p.data(), p.size());
          IgnoreError(store_->CommitPut(g->id));
        } else {
          bool in_ram;
          IgnoreError(
              store_->Put(h, reinterpret_cast<const uint8_t*>(p.data()), p.size(), &in_ram));
        }
      }
    });
  }
  std::thread deleter([&] {
    while (!stop.load()) {
      IgnoreError(store_->DeleteSession("race").status());
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });
  for (auto& t : writers) t.join();
  stop.store(true);
  deleter.join();
  std::map<uint64_t, std::string> live;
  for (uint64_t page = 0; page < 6; ++page) {
    auto r = ReadPayload("race", page);
    if (r.ok()) live[page] = *r;
  }
  store_.reset();
  Open();
  std::map<uint64_t, std::string> durable;
  for (uint64_t page = 0; page < 6; ++page) {
    auto r = ReadPayload("race", page);
    if (r.ok()) durable[page] = *r;
  }
  EXPECT_EQ(live, durable);
}

}  // namespace
}  // namespace fm
