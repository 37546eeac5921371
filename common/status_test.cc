#include "common/status.h"

#include <gtest/gtest.h>

#include "common/status_matchers.h"

namespace fm {
namespace {
using ::fm::testing::StatusIs;

absl::StatusOr<int> Half(int x) {
  if (x % 2) return absl::InvalidArgumentError("odd");
  return x / 2;
}
absl::Status Quarter(int x, int* out) {
  FM_ASSIGN_OR_RETURN(int h, Half(x));
  FM_ASSIGN_OR_RETURN(*out, Half(h));
  return absl::OkStatus();
}
absl::Status Chain(int x) {
  int q;
  FM_RETURN_IF_ERROR(Quarter(x, &q));
  return absl::OkStatus();
}

TEST(Status, Macros) {
  int q = 0;
  EXPECT_TRUE(Quarter(8, &q).ok());
  EXPECT_EQ(q, 2);
  EXPECT_THAT(Chain(6), StatusIs(absl::StatusCode::kInvalidArgument, "odd"));
}

TEST(Status, GrpcAdapterKeepsCodeAndMessage) {
  for (int c = 0; c <= 16; ++c) {
    absl::Status s(static_cast<absl::StatusCode>(c), c ? "msg" : "");
    grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
}

}  // namespace
}  // namespace fm
