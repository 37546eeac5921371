// absl::Status helpers and the single adapter between absl::Status and grpc::Status.
// absl and gRPC share status codes, so conversion keeps code and message unchanged.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define FM_STATUS_CONCAT_INNER_(a, b) a##b
#define FM_STATUS_CONCAT_(a, b) FM_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define FM_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::absl::Status fm_status_ = (expr);      \
    if (!fm_status_.ok()) return fm_status_; \
  } while (0)

// `lhs = value of expr`, or returns its error. expr is an absl::StatusOr<T>.
#define FM_ASSIGN_OR_RETURN(lhs, expr) \
  FM_ASSIGN_OR_RETURN_IMPL_(FM_STATUS_CONCAT_(fm_statusor_, __LINE__), lhs, expr)
#define FM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = std::move(tmp).value()

namespace fm {

// Converts at the RPC edge. Codes are numerically identical in absl and gRPC.
grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

// Deliberately ignores a status; greppable.
inline void IgnoreError(const absl::Status&) {}

}  // namespace fm
