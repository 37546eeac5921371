// The gRPC face of a DecodeCore (flashmemory.v1.Decode), callback API.
//
// Prefill streams raw K/V by token ranges ([layer][K|V][kv_head][token][head_dim] in the
// spec dtype) with their index keys (compressed, or raw fp32 that the worker compresses);
// the service pages them. DecodeStream carries batches of (session, step, layer) requests,
// any mix of sessions, per layer or whole steps (layer_count = L), and answers each request
// with its outputs or its own error code: one bad request never ends the stream.
#pragma once

#include "common/metrics.h"
#include "common/security.h"
#include "common/throttle.h"
#include "flashmemory/v1/decode.grpc.pb.h"
#include "services/decode/decode_core.h"

namespace fm::decode {

class DecodeService final : public flashmemory::v1::Decode::CallbackService {
 public:
  // auth (may be null: one default tenant): with a tokens file every call needs a tenant
  // token, and a tenant's session ids are scoped by its name (ScopedSessionId).
  // The refusal throttle (common/throttle.h) takes its rate from the core's options.
  explicit DecodeService(DecodeCore* core, const Authenticator* auth = nullptr)
      : core_(core),
        auth_(auth),
        throttle_(core->options().refused_bytes_per_s, core->options().refused_bytes_per_s) {}

  const RefusalThrottle& throttle() const { return throttle_; }
  // Shutdown begins: answers held by the refusal throttle go out now.
  void Drain() { throttle_.ReleaseAll(); }
  // fm_decode_refused_bytes_total and fm_decode_throttled_answers_total.
  void AddMetrics(MetricsRegistry* metrics) const;

  grpc::ServerUnaryReactor* OpenSession(grpc::CallbackServerContext* ctx,
                                        const flashmemory::v1::OpenSessionRequest* req,
                                        flashmemory::v1::OpenSessionResponse* resp) override;
  grpc::ServerReadReactor<flashmemory::v1::PrefillChunk>* Prefill(
      grpc::CallbackServerContext* ctx, flashmemory::v1::PrefillResponse* resp) override;
  grpc::ServerBidiReactor<flashmemory::v1::DecodeBatch, flashmemory::v1::DecodeResults>*
  DecodeStream(grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const flashmemory::v1::CloseSessionRequest* req,
                                         flashmemory::v1::CloseSessionResponse* resp) override;
  grpc::ServerUnaryReactor* GetSessionStats(grpc::CallbackServerContext* ctx,
                                            const flashmemory::v1::SessionStatsRequest* req,
                                            flashmemory::v1::SessionStatsResponse* resp) override;

 private:
  absl::StatusOr<Identity> Caller(const grpc::ServerContextBase& ctx) const {
    return auth_ ? auth_->RequireTenant(ctx) : absl::StatusOr<Identity>(Identity{});
  }
  DecodeCore* core_;
  const Authenticator* auth_;
  RefusalThrottle throttle_;  // outlives the server: declared before its runner in main
};

}  // namespace fm::decode
