// The fixed binary header that precedes every page payload in a RAM cell, a RocksDB value
// and every UCX read, so a reader can verify what it got: the header names the session and
// the page, and the checksum covers the payload. Little-endian, 256 bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/model_spec.h"

namespace fm {

inline constexpr size_t kMaxSessionIdBytes = 128;
inline constexpr size_t kPageHeaderBytes = 256;
inline constexpr uint32_t kPageMagic = 0x31504d46;  // "FMP1"

struct PageHeaderData {
  std::string session_id;
  uint64_t page = 0;
  uint64_t spec_hash = 0;
  uint32_t token_count = 0;
  uint64_t payload_bytes = 0;
  uint64_t checksum = 0;  // Checksum64 of the payload
  DType dtype = DType::kBf16;
  // Not part of the encoded header: the writer's ownership epoch of the session
  // (KvStore::ClaimSession); a write below the session's epoch is refused. 0 = unfenced.
  uint64_t epoch = 0;
};

// A header (checksum included) for a payload.
PageHeaderData MakePageHeader(const std::string& session_id, uint64_t page, uint64_t spec_hash,
                              uint32_t token_count, DType dtype, const void* payload, size_t len);

// Session ids are 1..kMaxSessionIdBytes bytes of anything.
absl::Status ValidateSessionId(absl::string_view id);

// Writes the header into out[0, kPageHeaderBytes). The header carries its own checksum.
void EncodePageHeader(const PageHeaderData& h, uint8_t* out);

// Parses and checks magic, version and the header's own checksum: DATA_LOSS on mismatch.
absl::Status DecodePageHeader(const uint8_t* in, PageHeaderData* h);

// Verifies a full record (header + payload) read from anywhere: the header decodes, names
// `session_id` and `page`, its payload length equals `payload_len`, and the payload checksum
// matches. DATA_LOSS otherwise, with a message naming what differed.
absl::Status VerifyPageRecord(const uint8_t* record, size_t record_len,
                              absl::string_view session_id, uint64_t page,
                              PageHeaderData* out = nullptr);

}  // namespace fm
