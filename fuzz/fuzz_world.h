// The in-process world of the service fuzz targets (decode_state_fuzz, service_requests_fuzz):
// a decode core over an in-memory page store and a real indexer core, with one tiny-spec
// session "s" opened, prefilled from the workload generator, stepped for two cycles and
// closed, so that its pages, index keys and saved state are in the store.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "common/page_format.h"
#include "services/decode/decode_core.h"
#include "services/decode/local_peers.h"
#include "services/indexer/indexer_core.h"
#include "tools/replay/replay.h"
#include "workload/generator.h"

namespace fm::fuzz {

// Pages in memory, verified on the way out like the kvstore's.
class MemPageStore : public decode::PageStore {
 public:
  absl::Status Put(const PageHeaderData& header, const uint8_t* payload) override;
  absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                    size_t payload_bytes, const std::vector<uint8_t*>& dst) override;
  absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) override;
  absl::Status DeleteSession(const std::string& session, uint64_t epoch) override;

 private:
  std::mutex mu_;
  std::map<std::pair<std::string, uint64_t>, std::pair<PageHeaderData, std::string>> pages_;
};

struct World {
  MemPageStore store;
  std::unique_ptr<indexer::IndexerCore> indexer;
  std::unique_ptr<decode::DecodeCore> core;
  std::unique_ptr<workload::Session> g;
  decode::SessionOptions options;  // s's (resume = false)
  std::string state;               // s's saved state after its close
  PageHeaderData state_header;     // the header it was saved under
};

// Builds the world once (aborts if it cannot: the fuzz target would test nothing).
World& TheWorld();

// The core's layer steps of one request of the generator's session (spans into `buffers`,
// and into r's index keys: r must outlive them).
std::vector<decode::LayerStep> StepsOf(const World& w, const std::string& session,
                                       const flashmemory::v1::LayerRequest& r,
                                       std::vector<std::vector<float>>* buffers);

}  // namespace fm::fuzz
