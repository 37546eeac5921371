// Seeded generator of long-context sessions with the structure of real long-context
// attention (DESIGN §7), for training the indexer and for every benchmark.
//
// The synthetic model. Every chunk c (chunk_tokens tokens) has a latent z_c in R^r: the
// first chunk is the attention sink (z = e_0); a history chunk belongs to a topical
// episode, z_c = normalize(e_topic(t_c) + noise) with e_topic drifting slowly over the
// history, plus a constant component (the mean offset real keys have); needles are single
// chunks with a fresh random direction. A decode step s has a focus topic f_s that persists
// for many steps, returns to topics written earlier, and occasionally follows the newest
// one; decoded tokens belong to the focus. Query latent of (layer l, head h) at step s:
//   y = beta_{l,h} f_s + sigma_s e_0 [+ lambda e_needle at a needle's retrieval step, in the
//   retrieval layers], logit(c) = y . z_c for every token of chunk c,
// with beta sharp or diffuse per head and sigma_s chosen so that the sink holds sink_share
// of each head's attention. The model's K for (layer, kv head) is A z + n_t (A: d x r with
// orthonormal columns; n_t a per-token variation orthogonal to A's span) and its query
// A y / softmax_scale, so that dense attention over the generated pages is exactly this
// softmax (up to the K dtype's rounding) while per-page K bounds are as loose as real
// keys' per-token variation makes them. V is random.
// Index keys: [B_l z_c ; 0] rotated at the chunk's position (RoPE + Hadamard; the rotated
// dims carry no content, so scores do not depend on position) and compressed to fp8. The hidden
// state at a cycle start carries the focus, the next focus when it switches within the cycle (with
// probability `anticipate`), and the needles the cycle retrieves: h = W_h [u ; 1] + noise.
//
// Golden labels of a cycle (DESIGN §3): the union over its tau steps of the chunks carrying
// the top-p attention mass (head-averaged) in at least m layers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "flashmemory/kernels/indexer.h"

namespace fm::workload {

struct Knobs {
  uint64_t world_seed = 1;       // the synthetic model: topics, projections, head types
  uint32_t latent_dim = 48;      // r (capped by the index key's unrotated dims)
  uint32_t vocab_topics = 512;   // topics of the world
  uint32_t session_topics = 24;  // distinct topics in one session's history
  double episode_tokens = 1024;  // mean length of a history episode
  double focus_steps = 300;      // mean decode steps on one focus topic
  double recent_focus = 0.2;     // P(a new focus is the newest history topic)
  double anticipate = 0.9;       // P(the hidden state announces a switch in its cycle)
  uint32_t needles = 4;          // needles per session, each retrieved by one decode step
  double chunk_noise = 0.5;      // per-chunk latent noise, relative to the topic vector
  double decoded_noise = 1.0;    // the same for decoded chunks (less on-topic than sources)
  double key_noise = 1.0;        // norm of each token's K variation outside every query's span
  double drift = 0.15;           // a topic's drift over the history (0 = none)
  double sink_share = 0.15;      // attention share of the sink chunk in every head
  double sharp_beta = 16;        // logit scale of sharp heads
  double diffuse_beta = 9;       // logit scale of diffuse heads
  double diffuse_heads = 0.25;   // fraction of diffuse heads
  double needle_gain = 28;       // lambda: logit of the needle at its retrieval step
  double hidden_noise = 0.05;    // noise of the hidden state, relative
  uint32_t tau = 8;              // cycle length in decode steps
  double top_p = 0.6;            // label: chunks carrying the top-p mass ...
  uint32_t label_layers = 1;     // ... in at least this many layers (m)
};

struct SessionConfig {
  ModelSpec spec;
  Knobs knobs;
  uint64_t seed = 0;            // the session's own randomness
  uint64_t prefill_tokens = 0;  // history before the first decode step
  uint32_t steps = 0;           // decode steps
};

struct Needle {
  uint64_t chunk;  // where it was written
  uint32_t step;   // the decode step that retrieves it
};

// The indexer geometry for a spec (RoPE on min(64, di / 2) dims) and tower rank.
kernels::IndexerShape IndexerShapeFor(const ModelSpec& spec, uint32_t rank);

class Session {
 public:
  // INVALID_ARGUMENT for a spec without an indexer or hidden state, no prefill, or steps
  // that are not whole cycles.
  static absl::StatusOr<std::unique_ptr<Session>> Generate(const SessionConfig& config);

  const SessionConfig& config() const { return config_; }
  const ModelSpec& spec() const { return config_.spec; }
  uint32_t latent_dim() const { return r_; }
  uint32_t cycles() const { return config_.steps / config_.knobs.tau; }
  uint64_t position(uint32_t step) const { return config_.prefill_tokens + step; }
  // Tokens attended at a step (the step's own token included).
  uint64_t tokens_at(uint32_t step) const { return position(step) + 1; }
  uint64_t total_chunks() const { return z_.size() / r_; }
  uint64_t total_pages() const;
  // Chunks of the sealed pages at a step: what the indexer holds.
  uint64_t indexed_chunks(uint32_t step) const;
  uint64_t pages_at(uint32_t step) const;  // pages holding tokens_at(step), the open one too

  // Index keys of every chunk, per index layer: [chunk][di + 4] stored format.
  const std::vector<uint8_t>& index_keys(uint32_t layer) const { return keys_[layer]; }
  // Hidden state at a step ([hidden_dim]); the indexer reads it at cycle starts.
  const float* hidden(uint32_t step) const { return hidden_.data() + size_t{step} * hd_; }
  // Head-averaged attention mass of each page at a step, summed over layers / L:
  // [pages_at(step)], summing to 1.
  const float* page_mass(uint32_t step) const { return page_mass_.data() + size_t{step} * np_; }
  // Golden labels of cycle k over indexed_chunks(k * tau) chunks (0/1).
  const uint8_t* labels(uint32_t cycle) const { return labels_.data() + size_t{cycle} * nc_; }
  const std::vector<Needle>& needles() const { return needles_; }
  const std::vector<uint32_t>& chunk_topics() const { return topic_of_; }  // -1u: sink/needle
  uint32_t focus(uint32_t step) const { return focus_[step]; }

  // The model's query of (layer, head) at a step: [head_dim] fp32.
  void ModelQuery(uint32_t step, uint32_t layer, uint32_t head, float* q) const;
  // The dense attention output of (layer, head) at a step, in exact arithmetic: [head_dim].
  // Costs a pass over the whole history.
  void DenseOutput(uint32_t step, uint32_t layer, uint32_t head, float* o) const;
  // Page payload ([layer][K|V][kv_head][token][d] in the spec's dtype, partial pages zero
  // padded) and its token count.
  uint32_t FillPage(uint64_t page, uint8_t* payload) const;
  // Quest bounds of a page's K (elementwise min and max over its tokens) for the given
  // model layers: [layer][kv_head][min|max][head_dim]. Cheaper than FillPage: tokens of a
  // chunk share their K.
  void PageBounds(uint64_t page, const std::vector<uint32_t>& layers, float* out) const;

 private:
  explicit Session(const SessionConfig& c) : config_(c) {}
  absl::Status Build();
  void QueryLatent(uint32_t step, uint32_t layer, uint32_t head, float* y) const;

  SessionConfig config_;
  uint32_t r_ = 0, hd_ = 0;
  uint64_t nc_ = 0, np_ = 0;  // label and page-mass row widths
  std::vector<float> z_;      // [chunk][r]
  std::vector<uint32_t> topic_of_;
  std::vector<uint32_t> focus_;  // per step
  std::vector<float> sigma_;     // per step and head class: sink logit
  std::vector<Needle> needles_;
  std::vector<std::vector<uint8_t>> keys_;
  std::vector<float> hidden_, page_mass_;
  std::vector<uint8_t> labels_;
  std::vector<std::vector<float>> a_;          // [layer * kv_heads]: d x r
  std::vector<std::vector<float>> at_;         // the same, transposed: r x d
  std::vector<std::vector<float>> key_noise_;  // [layer * kv_heads]: bank x d
  const float* NoiseOf(uint32_t layer, uint32_t kv_head, uint64_t token) const;
  void ValueOf(uint32_t layer, uint32_t kv_head, uint64_t token, float* v) const;
  void ChunkKey(uint32_t layer, uint32_t kv_head, uint64_t chunk, float* k) const;
  std::vector<uint8_t> diffuse_, retrieval_;           // [layer * q_heads], [layer]
  std::vector<std::vector<double>> needle_dir_;        // [needle]: r
  std::map<uint32_t, std::vector<double>> focus_dir_;  // focus topic -> direction
};

}  // namespace fm::workload
