// Test-only matchers: EXPECT_THAT(status_or_statusor, StatusIs(absl::StatusCode::kNotFound)).
#pragma once

#include <gmock/gmock.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/status.h"

namespace fm::testing {

inline absl::Status GetStatus(const absl::Status& s) { return s; }
template <typename T>
absl::Status GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}
inline absl::Status GetStatus(const grpc::Status& s) { return FromGrpcStatus(s); }

MATCHER_P(StatusIs, code, std::string("has status code ") + absl::StatusCodeToString(code)) {
  absl::Status s = GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, substring,
           std::string("has status code ") + absl::StatusCodeToString(code) +
               " and message containing \"" + substring + "\"") {
  absl::Status s = GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code && s.message().find(substring) != absl::string_view::npos;
}

MATCHER(IsOk, "is OK") {
  absl::Status s = GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.ok();
}

}  // namespace fm::testing
