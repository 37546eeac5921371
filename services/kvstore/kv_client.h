// Client library of the kvstore: one replica (KvClient) or many (ShardedKvClient, pages
// spread by rendezvous hashing of the page key over the replica list).
//
// Reads verify every record: the header must name the requested session and page and the
// payload checksum must match, otherwise DATA_LOSS. Every RPC carries a deadline.
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/page_format.h"
#include "flashmemory/v1/kvstore.grpc.pb.h"
#include "common/replicas.h"
#include "common/security.h"
#include "services/kvstore/kv_store.h"
#include "services/kvstore/ucx_transport.h"

namespace fm {

struct KvClientOptions {
  int deadline_ms = 10000;               // per RPC
  int max_message_bytes = 64 << 20;      // gRPC message limit
  bool use_ucx = true;                   // connect the UCX data path when the server offers it
  uint32_t lease_ms = 0;                 // lease for Resolve/GrantPut; 0 = server default
  uint64_t staging_bytes = 64ull << 20;  // registered buffer for ReadPayloads / PutUcx
  ClientSecurity security;               // TLS and the service token the store requires
};

// A page read back: its header and payload.
struct PageRecord {
  PageHeaderData header;
  std::string payload;
};

// A UCX endpoint and remote key to one server instance (kv_client.cc).
struct UcxLink;

class KvClient {
 public:
  // `engine` may be null (a private one is made when UCX is used); if given it must outlive
  // the client.
  static absl::StatusOr<std::unique_ptr<KvClient>> Connect(const std::string& target,
                                                           const KvClientOptions& options,
                                                           UcxEngine* engine = nullptr);
  ~KvClient();

  const std::string& target() const { return target_; }
  // Whether the server offers the UCX data path (the link itself reconnects on demand).
  bool has_ucx() const { return ucx_offered_; }
  // Times the UCX link was made again after a server restart or a broken peer.
  uint64_t ucx_reconnects() const { return reconnects_.load(); }
  UcxEngine* engine() const { return engine_; }
  flashmemory::v1::KvStore::Stub* stub() const { return stub_.get(); }

  // gRPC byte path.
  absl::Status Put(const PageHeaderData& header, const void* payload, bool* in_ram = nullptr);
  absl::StatusOr<std::vector<PageRecord>> Get(const std::vector<PageRef>& keys);

  // UCX path in two halves, so a caller can resolve the next batch while reading this one.
  // A server that restarted since the client's UCX link was made (its instance id differs)
  // gets a new link before any location of it is read; a location outside the instance's
  // arena is refused (DATA_LOSS). A link whose peer failed is dropped and made again at the
  // next Resolve.
  struct Resolved {
    uint64_t lease_id = 0;
    std::vector<PageRef> keys;
    std::vector<uint64_t> addresses, lengths;  // remote record location per key
    std::shared_ptr<UcxLink> link;             // the connection the locations belong to
  };
  absl::StatusOr<Resolved> Resolve(const std::vector<PageRef>& keys);
  // Reads and verifies each record into dst at dst_offsets[i], then ends the lease.
  absl::Status ReadResolved(const Resolved& resolved, const UcxRegion& dst,
                            const std::vector<uint64_t>& dst_offsets,
                            std::vector<PageHeaderData>* headers);

  // UCX path. Reads each page's record (header + payload) into dst at dst_offsets[i]
  // (each must leave room for the record), verifies it, releases the lease.
  absl::Status ReadUcx(const std::vector<PageRef>& keys, const UcxRegion& dst,
                       const std::vector<uint64_t>& dst_offsets,
                       std::vector<PageHeaderData>* headers);
  // UCX put: GrantPut, one-sided write of header + payload, CommitPut.
  absl::Status PutUcx(const PageHeaderData& header, const void* payload);
  // Reads via UCX when connected, else via gRPC; returns payloads.
  absl::StatusOr<std::vector<PageRecord>> Read(const std::vector<PageRef>& keys);

  absl::StatusOr<flashmemory::v1::PrefetchResponse> Prefetch(const std::vector<PageRef>& keys,
                                                             uint32_t lease_ms = 0);
  absl::Status Release(uint64_t lease_id);
  // epoch: the caller's ownership epoch (KvStore::ClaimSession); 0 = unfenced. Put and
  // PutUcx send header.epoch.
  absl::StatusOr<uint64_t> DeleteSession(const std::string& session_id, uint64_t epoch = 0);
  absl::Status CloseSession(const std::string& session_id, uint64_t epoch = 0);
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session_id, uint64_t min_epoch = 0);
  absl::StatusOr<flashmemory::v1::GetStatsResponse> Stats(const std::string& session = "");

 private:
  KvClient() = default;
  std::unique_ptr<grpc::ClientContext> Context() const;
  // Ends a lease without waiting for the answer.
  void ReleaseAsync(uint64_t lease_id);
  // The UCX link to server instance `instance`: the current one, or a new one (Connect RPC,
  // endpoint, remote key) when there is none, its peer broke, or the server restarted.
  absl::StatusOr<std::shared_ptr<UcxLink>> LinkFor(uint64_t instance);
  absl::StatusOr<std::shared_ptr<UcxLink>> Dial();
  void DropLink(const std::shared_ptr<UcxLink>& link);

  std::string target_;
  KvClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<flashmemory::v1::KvStore::Stub> stub_;
  std::unique_ptr<UcxEngine> own_engine_;
  UcxEngine* engine_ = nullptr;
  bool ucx_offered_ = false;
  std::mutex link_mu_;  // held while a link is made, so that one thread makes it
  std::shared_ptr<UcxLink> link_;
  std::atomic<uint64_t> reconnects_{0};
  std::mutex staging_mu_;
  std::unique_ptr<UcxRegion> staging_;
  // Releases in flight. The client waits for them when it goes, so that the channel's last
  // reference goes with the client: a release's context holds one, and gRPC tears down its
  // callback threads with the channel, which from one of those threads crashes.
  std::mutex release_mu_;
  std::condition_variable release_cv_;
  uint64_t releases_ = 0;
};

class ShardedKvClient {
 public:
  static absl::StatusOr<std::unique_ptr<ShardedKvClient>> Connect(
      const std::vector<std::string>& replicas, const KvClientOptions& options);
  size_t ReplicaFor(const std::string& session_id, uint64_t page) const;
  KvClient* replica(size_t i) const { return clients_[i].get(); }
  size_t size() const { return clients_.size(); }

  absl::Status Put(const PageHeaderData& header, const void* payload);
  // Reads pages from their replicas (UCX when available), in request order.
  absl::StatusOr<std::vector<PageRecord>> Read(const std::vector<PageRef>& keys);
  // The UCX engine the replicas share (null without UCX): regions mapped with it can be read
  // into in place.
  UcxEngine* engine() const { return engine_.get(); }
  // Reads each page's record (header + payload, verified) into dst at offsets[i], where
  // `room` bytes are free: one-sided UCX reads straight into dst from replicas that offer
  // UCX, the gRPC byte path copied in from the others. DATA_LOSS for a record larger than
  // `room`. headers (optional) receives each record's header.
  absl::Status ReadInto(const std::vector<PageRef>& keys, const UcxRegion& dst,
                        const std::vector<uint64_t>& offsets, uint64_t room,
                        std::vector<PageHeaderData>* headers = nullptr);
  // Deletes the session on every replica; NOT_FOUND only if no replica knew it.
  absl::StatusOr<uint64_t> DeleteSession(const std::string& session_id, uint64_t epoch = 0);
  // Marks it closed on every replica that holds it (KvStore::CloseSession); NOT_FOUND only
  // if none did.
  absl::Status CloseSession(const std::string& session_id, uint64_t epoch = 0);
  // Claims the session on every replica, at one epoch (the highest any replica needs).
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session_id);

 private:
  // Indices of keys per replica that holds them.
  std::map<size_t, std::vector<size_t>> ByReplica(const std::vector<PageRef>& keys) const;

  std::vector<std::string> names_;
  std::unique_ptr<UcxEngine> engine_;
  std::vector<std::unique_ptr<KvClient>> clients_;
};

}  // namespace fm
