// What a decode worker needs of an indexer (DESIGN §2, §3): the selection policies, a
// prediction's inputs and answer, and the abstract Indexer that the in-process core
// (IndexerCore) and the gRPC client (IndexerClient) both implement, so that a decode core
// takes either without an adapter.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"

namespace fm::indexer {

// Numbered as flashmemory.v1.Policy.
enum class Policy : uint8_t {
  kDefault = 0,
  kLsa = 1,
  kQuest = 2,
  kRecency = 3,
  kRandom = 4,
  kSinkRecency = 5,
  kOracle = 6,
  kDense = 7,
  kModelQuery = 8,
};
const char* PolicyName(Policy p);
absl::StatusOr<Policy> ParsePolicy(const std::string& name);

struct PredictArgs {
  uint64_t step = 0;
  std::vector<float> hidden;  // [hidden_dim], for lsa
  std::vector<float> query;   // [index_layers][q_heads][head_dim], for quest and model_query
  float budget = 0.1f;        // fraction of pages in (0, 1], sink and tail included
  uint32_t max_pages = 0;     // absolute page budget instead (0 = use budget)
  Policy policy = Policy::kDefault;
  uint32_t sink = 1, tail = 2;
  std::vector<float> oracle_page_mass;  // [pages] true mass over the cycle (oracle)
  // The history the prediction covers: its first history_pages pages (0 = all the session
  // holds). A caller that keeps appending pages while its prediction is in flight names the
  // history as of the step it predicts for, so that the answer does not depend on whether
  // later pages arrived first.
  uint64_t history_pages = 0;
};

struct ScoredPage {
  uint64_t page;
  float score;
};

struct Prediction {
  std::vector<ScoredPage> pages;  // ascending page number; sink and tail included
  uint64_t total_pages = 0;
  uint64_t chunks_scored = 0;
  double latency_ms = 0;
  Policy policy = Policy::kDefault;
};

// The indexer as a decode worker uses it. Thread-safe.
class Indexer {
 public:
  virtual ~Indexer() = default;
  // keys: [index_layer][chunks][di + 4] (stored format) for chunks [0, chunks); bounds:
  // `bound_pages` pages from page 0, [page][index_layer][kv_head][min|max][head_dim].
  virtual absl::Status Register(const std::string& session, const ModelSpec& spec,
                                const uint8_t* keys, uint64_t chunks, uint64_t tokens,
                                const float* bounds, uint64_t bound_pages) = 0;
  // Keys of chunks [first_chunk, first_chunk + chunks), bounds from page first_page: the
  // next expected ones.
  virtual absl::Status Append(const std::string& session, const ModelSpec& spec,
                              const uint8_t* keys, uint64_t first_chunk, uint64_t chunks,
                              uint64_t tokens, const float* bounds, uint64_t first_page,
                              uint64_t bound_pages) = 0;
  virtual absl::StatusOr<Prediction> Predict(const std::string& session,
                                             const PredictArgs& args) = 0;
  virtual absl::Status Drop(const std::string& session) = 0;
};

}  // namespace fm::indexer
