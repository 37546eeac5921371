// Client of one or more indexer replicas. Sessions live on the replica that rendezvous
// hashing of the session id picks; a replica that does not hold a session answers
// NOT_FOUND, and the caller re-registers it (a restarted or newly added replica).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/security.h"
#include "flashmemory/v1/indexer.grpc.pb.h"
#include "services/indexer/indexer_core.h"

namespace fm::indexer {

class IndexerClient : public Indexer {
 public:
  // replicas: as ResolveReplicas parses ("h:p,h:p" or "dns:NAME:PORT").
  static absl::StatusOr<std::unique_ptr<IndexerClient>> Connect(
      const std::string& replicas, int deadline_ms = 10000, const ClientSecurity& security = {});

  size_t ReplicaFor(const std::string& session) const;
  const std::vector<std::string>& replicas() const { return names_; }

  // keys: [index_layer][chunks][di + 4]; bounds: [pages][IndexerBoundsFloats(spec)].
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds = nullptr,
                        uint64_t bound_pages = 0) override;
  absl::Status Append(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens,
                      const float* bounds = nullptr, uint64_t first_page = 0,
                      uint64_t bound_pages = 0) override;
  absl::StatusOr<Prediction> Predict(const std::string& session, const PredictArgs& args) override;
  absl::Status Drop(const std::string& session) override;
  // Loads weights on every replica; returns the hash (equal on all).
  absl::StatusOr<uint64_t> LoadWeights(const std::string& path);
  absl::StatusOr<flashmemory::v1::IndexerStatsResponse> Stats(size_t replica);

 private:
  std::unique_ptr<grpc::ClientContext> Context() const;
  flashmemory::v1::Indexer::Stub* Stub(const std::string& session) const {
    return stubs_[ReplicaFor(session)].get();
  }
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<flashmemory::v1::Indexer::Stub>> stubs_;
  int deadline_ms_ = 10000;
  std::string token_;
};

}  // namespace fm::indexer
