// The Neural Memory Indexer's core (DESIGN §2, §3): every session's compressed index keys
// (kept in the scan layout), optional Quest bounds, the learned weights, and Predict with
// each selection policy. Thread-safe; the gRPC service and the all-in-one server wrap it.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/model_spec.h"
#include "flashmemory/kernels/indexer.h"
#include "services/indexer/indexer.h"

namespace fm::indexer {

// The query tower of every index layer, fp32, of one of two kinds (metadata "tower"):
//  - "chunk" (the default; DESIGN §3): safetensors with layer{l}.w_a [rank, hidden],
//    layer{l}.g [rank], layer{l}.w_b [heads * dim, rank], layer{l}.w_w [heads, hidden], and
//    metadata index_layers, index_heads, index_dim, hidden_dim, rank, rope_dims, rope_theta.
//    A chunk scores sum_h w_h relu(q_h . k_c) against its compressed chunk key.
//  - "token_query" (own models whose index keys hold the model's own K; docs/own-model.md):
//    layer{l}.w_q [heads * head_dim, hidden] and layer{l}.b_q [heads * head_dim] map the
//    hidden state to a predicted query q_l = w_q h + b_q of the index layer's q_heads heads,
//    scored per history token as the model's attention scores it (model_query's scoring);
//    metadata index_layers, index_heads (= q_heads), index_dim, hidden_dim, head_dim.
enum class Tower : uint8_t { kChunk = 0, kTokenQuery = 1 };

struct Weights {
  Tower tower = Tower::kChunk;
  kernels::IndexerShape shape;  // kTokenQuery: layers, heads, dim and hidden only
  uint32_t head_dim = 0;        // kTokenQuery
  std::vector<std::vector<float>> w_a, g, w_b, w_w;  // kChunk, per layer
  std::vector<std::vector<float>> w_q, b_q;          // kTokenQuery, per layer
  uint64_t hash = 0;

  static absl::StatusOr<std::shared_ptr<const Weights>> Load(const std::string& path);
  absl::Status Save(const std::string& path) const;
  // INVALID_ARGUMENT naming the first field where the weights and the spec disagree.
  absl::Status Matches(const ModelSpec& spec) const;
};

struct CoreOptions {
  uint64_t max_bytes = uint64_t{8} << 30;  // keys and bounds of every session
  uint32_t max_sessions = 4096;
  Policy default_policy = Policy::kLsa;
  // lsa: the share of the predicted pages chosen by their best chunk score before the rest
  // by kept-chunk count (kernels::SelectParams::best_share).
  float lsa_best_share = 0.125f;
};

struct CoreStats {
  uint64_t sessions = 0, chunks = 0, bytes = 0, predictions = 0;
  uint64_t weights_hash = 0;  // of the weights loaded last
  uint32_t weight_sets = 0;
};

class IndexerCore : public Indexer {
 public:
  explicit IndexerCore(CoreOptions options = {}) : options_(options) {}

  // keys: [index_layer][chunks][di + 4] (stored format) for chunks [0, chunks); bounds:
  // `bound_pages` pages from page 0, [page][index_layer][kv_head][min|max][head_dim].
  // `tokens` is the history length; keys must cover exactly its sealed pages or fewer.
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds = nullptr,
                        uint64_t bound_pages = 0) override;
  // Keys of chunks [first_chunk, first_chunk + chunks); first_chunk must be the next
  // expected chunk. Bounds likewise from the next expected page.
  absl::Status Append(const std::string& session, const uint8_t* keys, uint64_t first_chunk,
                      uint64_t chunks, uint64_t tokens, const float* bounds = nullptr,
                      uint64_t first_page = 0, uint64_t bound_pages = 0);
  // The same (the spec is the session's, known since Register).
  absl::Status Append(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens, const float* bounds,
                      uint64_t first_page, uint64_t bound_pages) override {
    return Append(session, keys, first_chunk, chunks, tokens, bounds, first_page, bound_pages);
  }
  absl::StatusOr<Prediction> Predict(const std::string& session, const PredictArgs& args) override;
  absl::Status Drop(const std::string& session) override;
  absl::StatusOr<ModelSpec> SessionSpec(const std::string& session) const;

  // The core holds one set of weights per index shape (layers, heads, dim, hidden), so one
  // indexer serves models of several specs; loading weights of a shape it holds replaces
  // them (reload without restart).
  // Logs the set it loaded (path, hash, shape) and the one it replaced.
  absl::Status LoadWeights(const std::string& path, uint64_t* hash = nullptr);
  // Returns the hash of the set of the same shape it replaced (0: a new shape).
  uint64_t SetWeights(std::shared_ptr<const Weights> w);
  // The weights loaded last (null when none).
  std::shared_ptr<const Weights> weights() const;
  // The weights that fit the spec (null when none do).
  std::shared_ptr<const Weights> WeightsFor(const ModelSpec& spec) const;
  CoreStats Stats() const;

 private:
  struct Session;
  std::shared_ptr<Session> Find(const std::string& session) const;

  CoreOptions options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<const Weights>> weights_ ABSL_GUARDED_BY(mu_);  // last loaded last
  std::atomic<uint64_t> bytes_{0}, predictions_{0};
};

// Floats of one page's Quest bounds as the indexer keeps them: the index layers only.
size_t IndexerBoundsFloats(const ModelSpec& spec);
// The model layer whose queries and bounds index layer l uses: the last index_layers
// layers of the model.
uint32_t ModelLayerOfIndexLayer(const ModelSpec& spec, uint32_t l);

}  // namespace fm::indexer
