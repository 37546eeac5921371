#include "common/page_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "common/checksum.h"
#include "common/status_matchers.h"

namespace fm {
namespace {
using ::fm::testing::StatusIs;

std::vector<uint8_t> MakeRecord(const std::string& sid, uint64_t page, size_t n) {
  std::vector<uint8_t> rec(kPageHeaderBytes + n);
  for (size_t i = 0; i < n; ++i) rec[kPageHeaderBytes + i] = static_cast<uint8_t>(i * 7 + page);
  PageHeaderData h;
  h.session_id = sid;
  h.page = page;
  h.payload_bytes = n;
  h.token_count = 17;
  h.spec_hash = 42;
  h.checksum = Checksum64(rec.data() + kPageHeaderBytes, n);
  EncodePageHeader(h, rec.data());
  return rec;
}

TEST(PageFormat, RoundTrip) {
  auto rec = MakeRecord(std::string("s\0x", 3), 9, 1000);
  PageHeaderData h;
  ASSERT_TRUE(VerifyPageRecord(rec.data(), rec.size(), std::string("s\0x", 3), 9, &h).ok());
  EXPECT_EQ(h.token_count, 17u);
  EXPECT_EQ(h.spec_hash, 42u);
  EXPECT_EQ(h.payload_bytes, 1000u);
}

TEST(PageFormat, DetectsEveryMismatch) {
  auto rec = MakeRecord("alice", 3, 500);
  EXPECT_THAT(VerifyPageRecord(rec.data(), rec.size(), "bob", 3),
              StatusIs(absl::StatusCode::kDataLoss, "bob"));
  EXPECT_THAT(VerifyPageRecord(rec.data(), rec.size(), "alice", 4),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(VerifyPageRecord(rec.data(), rec.size() - 1, "alice", 3),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(VerifyPageRecord(rec.data(), 10, "alice", 3), StatusIs(absl::StatusCode::kDataLoss));
  auto bad = rec;
  bad[kPageHeaderBytes + 100] ^= 1;
  EXPECT_THAT(VerifyPageRecord(bad.data(), bad.size(), "alice", 3),
              StatusIs(absl::StatusCode::kDataLoss, "checksum"));
  bad = rec;
  bad[20] ^= 1;  // a header field
  EXPECT_THAT(VerifyPageRecord(bad.data(), bad.size(), "alice", 3),
              StatusIs(absl::StatusCode::kDataLoss, "header"));
  std::vector<uint8_t> zeros(rec.size());
  EXPECT_THAT(VerifyPageRecord(zeros.data(), zeros.size(), "alice", 3),
              StatusIs(absl::StatusCode::kDataLoss, "magic"));
}

// One encoding per header: a byte the fields do not use (session-id padding, reserved) must
// be zero even when the header checksum is made to match (the fuzzer did exactly that).
TEST(PageFormat, RefusesNonZeroPaddingUnderAValidHeaderChecksum) {
  for (size_t at : {size_t{44}, size_t{100}, size_t{200}}) {
    auto rec = MakeRecord("s", 0, 64);
    rec[at] = 0x83;
    const uint64_t sum = Checksum64(rec.data(), 248);  // the header checksum's range
    std::memcpy(rec.data() + 248, &sum, 8);
    PageHeaderData h;
    EXPECT_THAT(DecodePageHeader(rec.data(), &h), StatusIs(absl::StatusCode::kDataLoss)) << at;
  }
}

TEST(PageFormat, SessionIdLimits) {
  EXPECT_THAT(ValidateSessionId(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(ValidateSessionId(std::string(128, 'a')).ok());
  EXPECT_THAT(ValidateSessionId(std::string(129, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, "128"));
}

}  // namespace
}  // namespace fm
