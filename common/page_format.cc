#include "common/page_format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"

namespace fm {

PageHeaderData MakePageHeader(const std::string& session_id, uint64_t page, uint64_t spec_hash,
                              uint32_t token_count, DType dtype, const void* payload, size_t len) {
  PageHeaderData h;
  h.session_id = session_id;
  h.page = page;
  h.spec_hash = spec_hash;
  h.token_count = token_count;
  h.dtype = dtype;
  h.payload_bytes = len;
  h.checksum = Checksum64(payload, len);
  return h;
}
namespace {

// Offsets inside the 256-byte header.
constexpr size_t kOffMagic = 0;          // u32
constexpr size_t kOffVersion = 4;        // u16
constexpr size_t kOffDtype = 6;          // u8
constexpr size_t kOffIdLen = 7;          // u8
constexpr size_t kOffPage = 8;           // u64
constexpr size_t kOffSpecHash = 16;      // u64
constexpr size_t kOffPayloadBytes = 24;  // u64
constexpr size_t kOffChecksum = 32;      // u64
constexpr size_t kOffTokens = 40;        // u32
constexpr size_t kOffSessionId = 48;     // 128 bytes, zero padded
constexpr size_t kOffHeaderSum = 248;    // u64 over [0, 248)
constexpr uint16_t kVersion = 1;

template <typename T>
void Put(uint8_t* p, size_t off, T v) {
  std::memcpy(p + off, &v, sizeof(T));
}
template <typename T>
T Get(const uint8_t* p, size_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof(T));
  return v;
}

}  // namespace

absl::Status ValidateSessionId(absl::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("session_id is empty");
  if (id.size() > kMaxSessionIdBytes)
    return absl::InvalidArgumentError(
        absl::StrCat("session_id is ", id.size(), " bytes; the limit is ", kMaxSessionIdBytes));
  return absl::OkStatus();
}

void EncodePageHeader(const PageHeaderData& h, uint8_t* out) {
  std::memset(out, 0, kPageHeaderBytes);
  Put<uint32_t>(out, kOffMagic, kPageMagic);
  Put<uint16_t>(out, kOffVersion, kVersion);
  Put<uint8_t>(out, kOffDtype, static_cast<uint8_t>(h.dtype));
  size_t n = std::min(h.session_id.size(), kMaxSessionIdBytes);
  Put<uint8_t>(out, kOffIdLen, static_cast<uint8_t>(n));
  Put<uint64_t>(out, kOffPage, h.page);
  Put<uint64_t>(out, kOffSpecHash, h.spec_hash);
  Put<uint64_t>(out, kOffPayloadBytes, h.payload_bytes);
  Put<uint64_t>(out, kOffChecksum, h.checksum);
  Put<uint32_t>(out, kOffTokens, h.token_count);
  std::memcpy(out + kOffSessionId, h.session_id.data(), n);
  Put<uint64_t>(out, kOffHeaderSum, Checksum64(out, kOffHeaderSum));
}

absl::Status DecodePageHeader(const uint8_t* in, PageHeaderData* h) {
  if (Get<uint32_t>(in, kOffMagic) != kPageMagic)
    return absl::DataLossError("page header: bad magic (not a page record)");
  if (Get<uint16_t>(in, kOffVersion) != kVersion)
    return absl::DataLossError(
        absl::StrCat("page header: unsupported version ", Get<uint16_t>(in, kOffVersion)));
  if (Get<uint64_t>(in, kOffHeaderSum) != Checksum64(in, kOffHeaderSum))
    return absl::DataLossError("page header: header checksum mismatch");
  size_t n = Get<uint8_t>(in, kOffIdLen);
  if (n > kMaxSessionIdBytes) return absl::DataLossError("page header: session id too long");
  h->session_id.assign(reinterpret_cast<const char*>(in + kOffSessionId), n);
  h->dtype = static_cast<DType>(Get<uint8_t>(in, kOffDtype));
  h->page = Get<uint64_t>(in, kOffPage);
  h->spec_hash = Get<uint64_t>(in, kOffSpecHash);
  h->payload_bytes = Get<uint64_t>(in, kOffPayloadBytes);
  h->checksum = Get<uint64_t>(in, kOffChecksum);
  h->token_count = Get<uint32_t>(in, kOffTokens);
  // Every byte the fields do not use is zero: one encoding per header (found by fuzzing: a
  // header with a non-zero padding byte and a matching header checksum decoded).
  uint8_t canonical[kPageHeaderBytes];
  EncodePageHeader(*h, canonical);
  if (std::memcmp(canonical, in, kPageHeaderBytes) != 0)
    return absl::DataLossError("page header: non-zero reserved or padding bytes");
  return absl::OkStatus();
}

absl::Status VerifyPageRecord(const uint8_t* record, size_t record_len,
                              absl::string_view session_id, uint64_t page, PageHeaderData* out) {
  if (record_len < kPageHeaderBytes)
    return absl::DataLossError(
        absl::StrCat("page record is ", record_len, " bytes, shorter than its header"));
  PageHeaderData h;
  absl::Status s = DecodePageHeader(record, &h);
  if (!s.ok()) return s;
  if (h.session_id != session_id || h.page != page)
    return absl::DataLossError(absl::StrCat("page record names session \"", h.session_id,
                                            "\" page ", h.page, ", expected \"", session_id,
                                            "\" page ", page));
  if (h.payload_bytes != record_len - kPageHeaderBytes)
    return absl::DataLossError(absl::StrCat("page record payload is ",
                                            record_len - kPageHeaderBytes, " bytes, header says ",
                                            h.payload_bytes));
  if (Checksum64(record + kPageHeaderBytes, h.payload_bytes) != h.checksum)
    return absl::DataLossError(
        absl::StrCat("page ", page, " of session \"", session_id, "\": payload checksum mismatch"));
  if (out) *out = std::move(h);
  return absl::OkStatus();
}

}  // namespace fm
