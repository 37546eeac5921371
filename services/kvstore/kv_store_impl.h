// Private: the KvStore implementation (RAM tier over a UCX-registered arena + RocksDB).
#pragma once

#include <array>
#include <condition_variable>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "services/kvstore/kv_store.h"
#include "services/kvstore/ram_tier.h"
#include "services/kvstore/rocks_tier.h"
#include "services/kvstore/ucx_transport.h"

namespace fm {

class KvStoreImpl final : public KvStore {
 public:
  KvStoreImpl(const KvStoreOptions& options, MetricsRegistry* metrics);
  ~KvStoreImpl() override;
  absl::Status Init();

  UcxEndpointInfo ucx() const override;
  absl::Status Put(const PageHeaderData& header, const uint8_t* payload, size_t len,
                   bool* in_ram) override;
  absl::Status Read(const PageRef& key, const std::function<void(const uint8_t*, size_t)>& sink,
                    bool* from_spill) override;
  absl::StatusOr<Lease> Acquire(const std::vector<PageRef>& keys, uint32_t lease_ms,
                                const std::string& client = "") override;
  absl::StatusOr<Lease> GrantPut(const PageHeaderData& header, uint32_t lease_ms,
                                 const std::string& client = "") override;
  absl::Status CommitPut(uint64_t lease_id) override;
  absl::Status Release(uint64_t lease_id) override;
  absl::StatusOr<uint64_t> DeleteSession(const std::string& session_id,
                                         uint64_t epoch = 0) override;
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session_id,
                                        uint64_t min_epoch = 0) override;
  absl::Status CloseSession(const std::string& session_id, uint64_t epoch = 0) override;
  absl::StatusOr<KvStats> Stats(const std::string& session) override;
  void TEST_ExpireLeases() override { ExpireLeases(); }

 private:
  struct PageInfo {
    uint64_t record_len = 0;
    uint64_t version = 0;  // bumped by every put; a read-back publishes only if unchanged
  };
  struct SessionState {
    uint64_t bytes = 0;
    absl::flat_hash_map<uint64_t, PageInfo> pages;
    uint64_t ram_pages = 0, hits = 0, misses = 0;
    uint64_t epoch = 0;  // the owner's (ClaimSession)
  };
  // ABORTED when `epoch` (non-zero) is below the session's owner epoch.
  absl::Status FenceLocked(const std::string& sid, uint64_t epoch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct LeaseState {
    std::vector<RamCell*> cells;
    std::chrono::steady_clock::time_point deadline;
    bool is_put = false;
    PageHeaderData put_header;  // put grants: what the client promised to write
    std::string put_key;
    bool had_old = false;  // put grants: the reservation to roll back
    PageInfo old_info;
    std::string client;  // who holds it, and the record bytes it pins
    uint64_t bytes = 0;
  };
  struct ClientUse {
    uint64_t leases = 0, bytes = 0;
  };
  // Counts a new lease of `client` pinning `bytes`, or RESOURCE_EXHAUSTED past a bound.
  absl::Status AdmitLeaseLocked(const std::string& client, uint64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetLeaseLocked(const LeaseState& lease) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status ValidateHeader(const PageHeaderData& h) const;
  // RESOURCE_EXHAUSTED when writing h would take its session over max_session_bytes.
  absl::Status CheckLimitLocked(const PageHeaderData& h) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Reserves session bytes for a new version of a page; returns the previous info.
  absl::Status ReserveLocked(const PageHeaderData& h, bool* had_old, PageInfo* old)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RollbackLocked(const PageHeaderData& h, bool had_old, const PageInfo& old)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  RamCell* AllocateLocked(uint64_t len) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishLocked(RamCell* cell, const std::string& key, const std::string& sid)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns a pinned, published cell holding the page (promoting it from RocksDB), or null
  // when RAM has no room (then `fallback` got the record, if given).
  absl::StatusOr<RamCell*> PinInRam(const PageRef& ref, const std::string& key, bool* promoted,
                                    const std::function<void(const uint8_t*, size_t)>* fallback);
  void EndLeaseLocked(LeaseState& lease) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint32_t LeaseMs(uint32_t requested) const;
  void ExpireLeases();
  void ReaperLoop();
  absl::Status PutRecord(const PageHeaderData& header, const uint8_t* payload, size_t len,
                         bool* in_ram, bool* reopened);
  // Deletes the sessions closed longer than closed_session_ttl_s ago.
  void ExpireClosedSessions();
  // Writes a session's close mark (close time, or 0 = open again).
  absl::Status WriteCloseMark(const std::string& sid, int64_t closed_at);
  void RenderMetrics(std::string* out);

  const KvStoreOptions options_;
  MetricsRegistry* metrics_;
  std::unique_ptr<UcxEngine> ucx_;
  std::unique_ptr<UcxRegion> region_;
  void* heap_ = nullptr;  // arena when UCX is off
  uint8_t* arena_ = nullptr;
  std::unique_ptr<RocksTier> disk_;

  // Writes of one page are serialised from reservation to publication by its stripe, so
  // a slower write never lands in RocksDB after a newer one; DeleteSession takes every
  // stripe so no write of the session lands after its range delete. Order: stripe, then mu_.
  static constexpr size_t kWriteStripes = 64;
  absl::Mutex& StripeFor(const std::string& key) {
    return write_stripes_[std::hash<std::string>()(key) % kWriteStripes];
  }
  std::array<absl::Mutex, kWriteStripes> write_stripes_;

  absl::Mutex mu_;
  std::unique_ptr<RamTier> ram_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, SessionState> sessions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, LeaseState> leases_ ABSL_GUARDED_BY(mu_);
  uint64_t next_lease_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<std::string, ClientUse> clients_ ABSL_GUARDED_BY(mu_);
  // Sessions marked closed: the close time (unix seconds).
  absl::flat_hash_map<std::string, int64_t> closed_ ABSL_GUARDED_BY(mu_);
  uint64_t next_version_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t spill_reads_ ABSL_GUARDED_BY(mu_) = 0;

  Counter* puts_metric_ = nullptr;
  Counter* put_bytes_metric_ = nullptr;
  Counter* read_bytes_metric_ = nullptr;

  std::mutex reaper_mu_;
  std::condition_variable reaper_cv_;
  bool stop_ = false;
  std::thread reaper_;
};

}  // namespace fm
