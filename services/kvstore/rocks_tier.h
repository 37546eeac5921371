// The durable tier: every page record (binary header + payload) in RocksDB with the WAL on,
// plus a "meta" column family of headers alone so a restart can rebuild per-session totals
// without reading payloads. Thread-safe (RocksDB is).
//
// Keys: [u8 session id length][session id bytes][u64 page, big-endian], so a session's
// pages are contiguous and ordered by page number.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace fm {

std::string EncodePageKey(absl::string_view session_id, uint64_t page);
// Splits a key made by EncodePageKey; false when malformed.
bool DecodePageKey(absl::string_view key, std::string* session_id, uint64_t* page);

struct RocksTierOptions {
  std::string path;          // database directory; created when missing
  bool sync_writes = false;  // fsync the WAL on every put. false survives a process kill
                             // (kill -9), true also survives power loss
  uint64_t block_cache_bytes = 64u << 20;  // RocksDB block cache
};

class RocksTier {
 public:
  static absl::StatusOr<std::unique_ptr<RocksTier>> Open(const RocksTierOptions& options);
  ~RocksTier();

  // Writes header + payload as one record, atomically with its meta entry.
  absl::Status Put(const std::string& key, const uint8_t* header, size_t header_len,
                   const uint8_t* payload, size_t payload_len);
  // Calls `consume` with the record bytes (valid only during the call). NOT_FOUND if absent.
  absl::Status Get(const std::string& key,
                   const std::function<absl::Status(const uint8_t*, size_t)>& consume);
  absl::Status DeleteSession(absl::string_view session_id);
  // Calls fn(key, header bytes) for every stored page, in key order.
  absl::Status ScanHeaders(const std::function<void(absl::string_view, absl::string_view)>& fn);
  // Approximate bytes on disk (SST + memtables).
  uint64_t ApproximateBytes() const;

 private:
  RocksTier() = default;
  RocksTierOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  rocksdb::ColumnFamilyHandle* pages_cf_ = nullptr;
  rocksdb::ColumnFamilyHandle* meta_cf_ = nullptr;
};

}  // namespace fm
