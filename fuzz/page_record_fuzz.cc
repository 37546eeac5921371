// libFuzzer target: a page record (64-byte header + payload) as it arrives from a peer or
// from RocksDB. DecodePageHeader and VerifyPageRecord must answer OK or DATA_LOSS for any
// bytes, never read outside them; a record that verifies re-encodes to the same header.
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/page_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Copies, so that reads past the end are caught exactly.
  std::vector<uint8_t> rec(data, data + size);
  fm::PageHeaderData h;
  if (size >= fm::kPageHeaderBytes && fm::DecodePageHeader(rec.data(), &h).ok()) {
    uint8_t again[fm::kPageHeaderBytes];
    fm::EncodePageHeader(h, again);
    if (std::memcmp(again, rec.data(), fm::kPageHeaderBytes) != 0) __builtin_trap();
    fm::PageHeaderData v;
    if (fm::VerifyPageRecord(rec.data(), rec.size(), h.session_id, h.page, &v).ok() &&
        (v.payload_bytes + fm::kPageHeaderBytes != rec.size() || v.checksum != h.checksum))
      __builtin_trap();
  }
  (void)fm::VerifyPageRecord(rec.data(), rec.size(), "s", 0);
  return 0;
}
