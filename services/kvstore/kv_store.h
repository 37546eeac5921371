// The tiered KV store: the contract behind the KvStore gRPC service (and the all-in-one
// server). Every method is thread-safe. Errors:
//   INVALID_ARGUMENT  malformed input (empty or over-long session id, payload length that
//                     disagrees with its header, unknown dtype, too many keys)
//   DATA_LOSS         a payload whose checksum does not match its header, or a record that
//                     fails verification when it crosses tiers
//   NOT_FOUND         unknown session, page, or lease (also: an expired lease)
//   RESOURCE_EXHAUSTED over a limit: page size, bytes per session, RAM full of pinned pages
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "common/page_format.h"

namespace fm {

struct KvStoreOptions {
  std::string db_path = "fm-data/kvstore";  // RocksDB directory
  uint64_t ram_bytes = 1ull << 30;          // RAM tier budget in bytes (the UCX arena size)
  uint64_t max_page_bytes = 64ull << 20;    // largest payload accepted, bytes
  uint64_t max_session_bytes = 0;     // durable bytes per session (headers included); 0 = unlimited
  uint32_t max_keys_per_call = 4096;  // pages per Get/Resolve/Prefetch call
  uint32_t default_lease_ms = 30000;  // lease length when a request says 0
  uint32_t max_lease_ms = 600000;     // longest lease granted
  // Bounds of the lease table and of each client's share of it (a client: one connection,
  // as its gRPC peer names it), so that no client can pin the whole RAM tier.
  uint32_t max_leases = 65536;
  uint32_t max_leases_per_client = 1024;
  uint64_t max_pinned_bytes_per_client = 0;  // 0 = half the RAM tier
  bool sync_writes = false;           // fsync WAL per put (power-loss durability)
  bool enable_ucx = true;             // register the arena with UCX; false = gRPC byte path only
  // A session marked closed (CloseSession) and not written since is deleted this long after
  // its close; 0 = never.
  uint64_t closed_session_ttl_s = 3600;
  uint64_t slab_bytes = 64ull << 20;  // largest record cached in RAM (larger: RocksDB only)
};

// The page number of a session's close mark (KvStore::CloseSession).
inline constexpr uint64_t kClosedMarkPage = ~uint64_t{0};
// The page number of a session's ownership epoch record (KvStore::ClaimSession).
inline constexpr uint64_t kEpochPage = ~uint64_t{0} - 1;

struct PageRef {
  std::string session_id;
  uint64_t page = 0;
};

// A RAM location handed out under a lease (remote address = arena base + offset).
struct LeasedLocation {
  PageRef key;
  uint64_t address = 0;  // process virtual address of the record (header first)
  uint64_t length = 0;   // header + payload bytes
};

struct Lease {
  uint64_t id = 0;
  std::vector<LeasedLocation> locations;
  uint32_t promoted = 0;  // pages read back from RocksDB to serve this lease
};

struct KvSessionStats {
  std::string session_id;
  uint64_t pages = 0, bytes = 0, ram_pages = 0, hits = 0, misses = 0;
};

struct KvStats {
  uint64_t ram_bytes = 0, ram_pages = 0, ram_capacity = 0;
  uint64_t disk_bytes = 0, disk_pages = 0;
  uint64_t hits = 0, misses = 0, evictions = 0, spill_reads = 0;
  uint64_t pinned_pages = 0, active_leases = 0;
  std::vector<KvSessionStats> sessions;
};

// UCX identity of the RAM arena; empty when UCX is disabled.
struct UcxEndpointInfo {
  std::string worker_address;
  std::string rkey;
  uint64_t arena_base = 0;
  uint64_t arena_bytes = 0;
};

class KvStore {
 public:
  // Opens (or recovers) the store at options.db_path. `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<KvStore>> Open(const KvStoreOptions& options,
                                                       MetricsRegistry* metrics);
  virtual ~KvStore() = default;

  virtual UcxEndpointInfo ucx() const = 0;

  // Stores a page. Acknowledged (OK) once the record is in RocksDB's WAL; also kept in RAM
  // when a cell is free or evictable (*in_ram).
  virtual absl::Status Put(const PageHeaderData& header, const uint8_t* payload, size_t len,
                           bool* in_ram) = 0;
  // Calls sink(record, record_len) with the verified record (header + payload) while it is
  // held stable. *from_spill = it was read back from RocksDB.
  virtual absl::Status Read(const PageRef& key,
                            const std::function<void(const uint8_t*, size_t)>& sink,
                            bool* from_spill) = 0;
  // Puts every page in RAM (promoting spilled ones) and pins them under a new lease.
  // client: who holds the lease, for the per-client bounds (RESOURCE_EXHAUSTED beyond them).
  virtual absl::StatusOr<Lease> Acquire(const std::vector<PageRef>& keys, uint32_t lease_ms,
                                        const std::string& client = "") = 0;
  // Reserves a RAM cell for a page the client writes itself (UCX put). The cell is private
  // until Commit.
  virtual absl::StatusOr<Lease> GrantPut(const PageHeaderData& header, uint32_t lease_ms,
                                         const std::string& client = "") = 0;
  // Verifies the record written into the granted cell against the granted header, makes it
  // durable and visible. The lease ends either way.
  virtual absl::Status CommitPut(uint64_t lease_id) = 0;
  virtual absl::Status Release(uint64_t lease_id) = 0;
  // epoch (DeleteSession, CloseSession, and PageHeaderData::epoch of a Put or GrantPut): the
  // caller's ownership epoch of the session; below the session's, ABORTED ("session moved
  // to another worker") and nothing changes. 0 = unfenced (tools, tests).
  virtual absl::StatusOr<uint64_t> DeleteSession(const std::string& session_id,
                                                 uint64_t epoch = 0) = 0;
  // Makes the caller the session's owner: its epoch becomes max(epoch + 1, min_epoch),
  // durably (page kEpochPage, its header's spec_hash the epoch), and every later write of a
  // lower epoch is refused. A decode worker claims a session when it opens or resumes it.
  virtual absl::StatusOr<uint64_t> ClaimSession(const std::string& session_id,
                                                uint64_t min_epoch = 0) = 0;
  // Marks a session closed: kept for a resume, and deleted closed_session_ttl_s after the
  // close unless a page of it is written first (a resuming worker claims it, which writes).
  // The mark is a durable record (page kClosedMarkPage, its header's spec_hash the close
  // time in unix seconds, 0 once reopened) that a restart re-arms. NOT_FOUND: unknown.
  virtual absl::Status CloseSession(const std::string& session_id, uint64_t epoch = 0) = 0;
  // session = "" : no per-session rows; "*" : all sessions; else that session (NOT_FOUND if
  // unknown).
  virtual absl::StatusOr<KvStats> Stats(const std::string& session) = 0;

  // Ends expired leases now (also done periodically by a background thread).
  virtual void TEST_ExpireLeases() = 0;
};

}  // namespace fm
