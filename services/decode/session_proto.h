// A session's options on the wire (OpenSessionRequest), written once for the client and the
// service: every SessionOptions field but the session id, which the caller sets (the
// service scopes it to the tenant).
#pragma once

#include "absl/status/statusor.h"
#include "flashmemory/v1/decode.pb.h"
#include "services/decode/decode_core.h"

namespace fm::decode {

// with_oracle: the evaluation-only oracle_page_mass too (a saved state leaves it out).
void SessionOptionsToProto(const SessionOptions& o, flashmemory::v1::OpenSessionRequest* req,
                           bool with_oracle = true);

// INVALID_ARGUMENT for an unknown mode or policy. The defaults resolve here: a budget of 0
// is 0.1 (the rest of the zeros mean "the worker's" and stay zero).
absl::StatusOr<SessionOptions> SessionOptionsFromProto(
    const flashmemory::v1::OpenSessionRequest& req);

}  // namespace fm::decode
