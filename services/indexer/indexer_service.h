// The gRPC face of an IndexerCore (flashmemory.v1.Indexer), callback API.
#pragma once

#include "common/security.h"
#include "flashmemory/v1/indexer.grpc.pb.h"
#include "services/indexer/indexer_core.h"

namespace fm::indexer {

class IndexerService final : public flashmemory::v1::Indexer::CallbackService {
 public:
  // auth (may be null: every caller allowed): every RPC needs a service identity.
  // weights_dir: where LoadWeights may read (see IndexerFlags::weights_dir).
  explicit IndexerService(IndexerCore* core, const Authenticator* auth = nullptr,
                          std::string weights_dir = "")
      : core_(core), auth_(auth), weights_dir_(std::move(weights_dir)) {}

  grpc::ServerUnaryReactor* RegisterSession(
      grpc::CallbackServerContext* ctx, const flashmemory::v1::RegisterSessionRequest* req,
      flashmemory::v1::RegisterSessionResponse* resp) override;
  grpc::ServerUnaryReactor* AppendKeys(grpc::CallbackServerContext* ctx,
                                       const flashmemory::v1::AppendKeysRequest* req,
                                       flashmemory::v1::AppendKeysResponse* resp) override;
  grpc::ServerUnaryReactor* Predict(grpc::CallbackServerContext* ctx,
                                    const flashmemory::v1::PredictRequest* req,
                                    flashmemory::v1::PredictResponse* resp) override;
  grpc::ServerUnaryReactor* DropSession(grpc::CallbackServerContext* ctx,
                                        const flashmemory::v1::DropSessionRequest* req,
                                        flashmemory::v1::DropSessionResponse* resp) override;
  grpc::ServerUnaryReactor* LoadWeights(grpc::CallbackServerContext* ctx,
                                        const flashmemory::v1::LoadWeightsRequest* req,
                                        flashmemory::v1::LoadWeightsResponse* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const flashmemory::v1::IndexerStatsRequest* req,
                                     flashmemory::v1::IndexerStatsResponse* resp) override;

 private:
  absl::Status Allow(const grpc::ServerContextBase& ctx) const {
    return auth_ ? auth_->RequireService(ctx).status() : absl::OkStatus();
  }
  // The file a LoadWeights path names, if the service may read it.
  absl::StatusOr<std::string> WeightsPath(const std::string& path) const;

  IndexerCore* core_;
  const Authenticator* auth_;
  std::string weights_dir_;
};

}  // namespace fm::indexer
