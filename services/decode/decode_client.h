// Client of a decode worker (fm-decode or the all-in-one server): open a session, stream its
// prefill, run decode steps over a bidirectional stream, read stats, close. Every unary RPC
// carries a deadline; a step stream lives as long as its session's decoding.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "flashmemory/v1/decode.grpc.pb.h"
#include "common/security.h"
#include "services/decode/decode_core.h"

namespace fm::decode {

class DecodeClient {
 public:
  // security: TLS files and the tenant's bearer token (common/security.h).
  static absl::StatusOr<std::unique_ptr<DecodeClient>> Connect(
      const std::string& target, int deadline_ms = 60000, const ClientSecurity& security = {});

  // Returns the cells the admission reserved.
  absl::StatusOr<uint64_t> Open(const std::string& session, const SessionOptions& options);
  // Streams whole pages ([n][PageBytes]; the history has `tokens` tokens, the last page may
  // be partial) and the index keys of its complete chunks ([index layer][chunks][di + 4]).
  absl::Status Prefill(const std::string& session, const ModelSpec& spec, const uint8_t* pages,
                       uint64_t n_pages, uint64_t tokens, const uint8_t* keys, uint64_t chunks);
  absl::Status Close(const std::string& session, bool delete_pages = false);
  // probe: pages whose residency to report (probe_resident in the answer).
  absl::StatusOr<flashmemory::v1::SessionStatsResponse> Stats(
      const std::string& session, const std::vector<uint64_t>& probe = {});

  // A step stream: write a batch, read its results, in lockstep.
  class Stream {
   public:
    ~Stream();
    absl::StatusOr<flashmemory::v1::DecodeResults> Run(const flashmemory::v1::DecodeBatch& batch);
    absl::Status Finish();

   private:
    friend class DecodeClient;
    grpc::ClientContext ctx_;
    std::unique_ptr<
        grpc::ClientReaderWriter<flashmemory::v1::DecodeBatch, flashmemory::v1::DecodeResults>>
        rw_;
    bool finished_ = false;
  };
  std::unique_ptr<Stream> OpenStream();

 private:
  std::unique_ptr<grpc::ClientContext> Context() const;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<flashmemory::v1::Decode::Stub> stub_;
  int deadline_ms_ = 60000;
  std::string token_;
};

}  // namespace fm::decode
