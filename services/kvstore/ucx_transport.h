// Thin RAII wrappers over UCX (ucp) for the kvstore data path: one-sided ucp_get / ucp_put
// between registered memory regions. The server exposes its RAM arena; clients read pages
// straight into their own registered buffers with no copy on the server's CPU.
//
// Memory must come from UcxEngine::MapRegion (ucp_mem_map with UCP_MEM_MAP_ALLOCATE): UCX
// then picks shared-memory or RDMA transports, where plain malloc'd memory would fall back
// to slow emulation.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fm {

class UcxEngine;

// A memory region registered with a UcxEngine's context. Not copyable.
class UcxRegion {
 public:
  ~UcxRegion();
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  ucp_mem_h memh() const { return memh_; }
  // The remote key a peer unpacks to access this region.
  const std::string& packed_rkey() const { return rkey_; }

 private:
  friend class UcxEngine;
  UcxRegion() = default;
  ucp_context_h context_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string rkey_;
};

// One ucp context + worker. With `progress_thread` the engine progresses its worker on a
// background thread (servers: peers' wire-up and RMA need the target to progress);
// otherwise the caller's operations progress it. Thread-safe.
class UcxEngine {
 public:
  static absl::StatusOr<std::unique_ptr<UcxEngine>> Create(bool progress_thread);
  ~UcxEngine();

  // The packed worker address peers connect to.
  const std::string& worker_address() const { return address_; }
  absl::StatusOr<std::unique_ptr<UcxRegion>> MapRegion(size_t bytes);

  ucp_worker_h worker() const { return worker_; }
  std::mutex& worker_mutex() { return worker_mu_; }

 private:
  UcxEngine() = default;
  void ProgressLoop();

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  std::mutex worker_mu_;
  std::thread progress_;
  std::atomic<bool> stop_{false};
  int efd_ = -1;
};

// A connection from this engine to one remote worker, with one remote region's key.
class UcxPeer {
 public:
  struct Op {
    uint64_t remote_address;
    uint8_t* local;  // inside `local_region`
    size_t length;
  };
  static absl::StatusOr<std::unique_ptr<UcxPeer>> Connect(UcxEngine* engine,
                                                          const std::string& remote_worker_address,
                                                          const std::string& packed_rkey);
  ~UcxPeer();

  // Posts every get (or put) and waits for all of them, up to timeout_ms. UNAVAILABLE when
  // the peer fails or the deadline passes (the peer is then unusable).
  absl::Status Get(const std::vector<Op>& ops, const UcxRegion& local_region,
                   int timeout_ms = 10000);
  absl::Status Put(const std::vector<Op>& ops, const UcxRegion& local_region,
                   int timeout_ms = 10000);
  bool broken() const { return broken_.load(); }

 private:
  UcxPeer() = default;
  absl::Status Run(bool is_get, const std::vector<Op>& ops, const UcxRegion& local, int timeout_ms);

  UcxEngine* engine_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  std::atomic<bool> broken_{false};
};

}  // namespace fm
