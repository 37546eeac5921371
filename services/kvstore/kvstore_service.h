// The gRPC face of a KvStore (flashmemory.v1.KvStore), callback API.
#pragma once

#include "common/security.h"
#include "flashmemory/v1/kvstore.grpc.pb.h"
#include "services/kvstore/kv_store.h"

namespace fm {

// Proto <-> header conversions shared by the service and its clients.
PageHeaderData HeaderFromProto(const flashmemory::v1::PageHeader& p);
void HeaderToProto(const PageHeaderData& h, flashmemory::v1::PageHeader* p);
// A random non-zero id for one server process (ConnectResponse.instance_id).
uint64_t NewInstanceId();

class KvStoreService final : public flashmemory::v1::KvStore::CallbackService {
 public:
  // `store` must outlive the service. GetPages takes at most max_keys_per_call pages.
  // auth (may be null: every caller allowed): every RPC needs a service identity.
  explicit KvStoreService(KvStore* store, uint32_t max_keys_per_call = 4096,
                          const Authenticator* auth = nullptr)
      : store_(store), max_keys_(max_keys_per_call), instance_id_(NewInstanceId()), auth_(auth) {}
  uint64_t instance_id() const { return instance_id_; }

  grpc::ServerUnaryReactor* Connect(grpc::CallbackServerContext* ctx,
                                    const flashmemory::v1::ConnectRequest* req,
                                    flashmemory::v1::ConnectResponse* resp) override;
  grpc::ServerUnaryReactor* PutPage(grpc::CallbackServerContext* ctx,
                                    const flashmemory::v1::PutPageRequest* req,
                                    flashmemory::v1::PutPageResponse* resp) override;
  grpc::ServerWriteReactor<flashmemory::v1::PageData>* GetPages(
      grpc::CallbackServerContext* ctx, const flashmemory::v1::GetPagesRequest* req) override;
  grpc::ServerUnaryReactor* Resolve(grpc::CallbackServerContext* ctx,
                                    const flashmemory::v1::ResolveRequest* req,
                                    flashmemory::v1::ResolveResponse* resp) override;
  grpc::ServerUnaryReactor* GrantPut(grpc::CallbackServerContext* ctx,
                                     const flashmemory::v1::GrantPutRequest* req,
                                     flashmemory::v1::GrantPutResponse* resp) override;
  grpc::ServerUnaryReactor* CommitPut(grpc::CallbackServerContext* ctx,
                                      const flashmemory::v1::CommitPutRequest* req,
                                      flashmemory::v1::CommitPutResponse* resp) override;
  grpc::ServerUnaryReactor* Prefetch(grpc::CallbackServerContext* ctx,
                                     const flashmemory::v1::PrefetchRequest* req,
                                     flashmemory::v1::PrefetchResponse* resp) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const flashmemory::v1::ReleaseRequest* req,
                                    flashmemory::v1::ReleaseResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx,
                                          const flashmemory::v1::DeleteSessionRequest* req,
                                          flashmemory::v1::DeleteSessionResponse* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const flashmemory::v1::KvCloseSessionRequest* req,
                                         flashmemory::v1::KvCloseSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ClaimSession(grpc::CallbackServerContext* ctx,
                                         const flashmemory::v1::ClaimSessionRequest* req,
                                         flashmemory::v1::ClaimSessionResponse* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const flashmemory::v1::GetStatsRequest* req,
                                     flashmemory::v1::GetStatsResponse* resp) override;

 private:
  absl::Status Allow(const grpc::ServerContextBase& ctx) const {
    return auth_ ? auth_->RequireService(ctx).status() : absl::OkStatus();
  }

  KvStore* store_;
  uint32_t max_keys_;
  const uint64_t instance_id_;
  const Authenticator* auth_;
};

}  // namespace fm
