// Replays generated sessions through a decode worker over gRPC, as an inference engine
// would drive it: prefill, then every decode step per layer (a real model learns layer
// l + 1's query only after layer l's output) or as whole steps (a replay client that knows
// every query up front). Shared by fmctl demo, fm-bench e2e and the integration tests.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/decode/decode_client.h"
#include "workload/generator.h"

namespace fm::replay {

struct ReplayOptions {
  std::string session_id;
  decode::Mode mode = decode::Mode::kSparse;
  float budget = 0.1f;
  indexer::Policy policy = indexer::Policy::kDefault;
  bool whole_step = false;  // one request per step (all layers) instead of per layer
  bool close = true;        // close the session at the end (history kept)
  float miss_ratio = 0;     // the session's synchronous miss check (0 = off)
};

inline constexpr uint32_t kNeedleWatchSteps = 32;

struct ReplayResult {
  std::vector<float> out;       // [step][layer][q_heads][head_dim]
  std::vector<float> lse;       // [step][layer][q_heads]
  std::vector<double> step_ms;  // wall time of each decode step
  double prefill_s = 0, decode_s = 0;
  std::vector<uint32_t> stalled_at;  // the steps that waited for a fetch
  uint64_t needles = 0, needle_hits = 0;  // needle pages resident at their retrieval steps
  // A needle whose page was not resident at its retrieval step is watched for
  // kNeedleWatchSteps more steps: how many steps later its page was resident (probed after
  // each step), -1 when it was not within the watch (or the session ended first).
  std::vector<int> needle_recovery_steps;
  // The missed needles' retrieval steps within their cycles (step % tau), in order of miss:
  // a miss in the first switch-lag steps of a cycle is one its own prediction came too late
  // for.
  std::vector<uint32_t> needle_miss_cycle_steps;
  std::vector<std::pair<uint64_t, uint32_t>> watching;  // (page, retrieval step), in progress
  flashmemory::v1::SessionStatsResponse stats;
};

// Pages and index keys of a generated session's prefill.
struct PrefillData {
  std::vector<uint8_t> pages;  // [pages][PageBytes]
  std::vector<uint8_t> keys;   // [index layer][chunks][di + 4]
  uint64_t n_pages = 0, chunks = 0;
};
PrefillData MakePrefill(const workload::Session& g);

// Builds the decode requests of a generated session: the model's queries, the new token's K
// and V (from its page, in the spec dtype), the chunk's index keys when the token completes
// one, and the hidden state at cycle starts (on layer 0).
class StepSource {
 public:
  StepSource(const workload::Session& g, std::string id, uint32_t tau)
      : g_(g), id_(std::move(id)), tau_(tau) {}
  // The request of (step, layer), or of the whole step when layer_count = L.
  flashmemory::v1::LayerRequest Request(uint32_t step, uint32_t layer, uint32_t layer_count);

 private:
  const workload::Session& g_;
  std::string id_;
  uint32_t tau_;
  uint64_t cached_page_ = UINT64_MAX;
  std::vector<uint8_t> page_;
};

// Opens the session and streams its prefill (res->prefill_s).
absl::Status OpenAndPrefill(decode::DecodeClient& client, const workload::Session& g,
                            const PrefillData& prefill, const ReplayOptions& options,
                            ReplayResult* res);
// Decodes steps [begin, end) on a stream; fills res->out/lse (sized for every step of the
// session), step_ms, decode_s, stalled steps and needle hits.
absl::Status DecodeSteps(decode::DecodeClient& client, decode::DecodeClient::Stream& stream,
                         const workload::Session& g, const std::string& id, uint32_t begin,
                         uint32_t end, bool whole_step, ReplayResult* res);
// OpenAndPrefill, every step, stats, close.
absl::StatusOr<ReplayResult> Replay(decode::DecodeClient& client, const workload::Session& g,
                                    const PrefillData& prefill, const ReplayOptions& options);

// Sparse against dense over the same session: per (step, layer, head) cosine and relative L2
// of the outputs, and mass recall exp(lse_sparse - lse_dense) (the share of the dense
// attention probability on the tokens the sparse step attended).
struct Fidelity {
  double cosine_mean = 0, cosine_min = 1, rel_l2_mean = 0, mass_recall = 0;
};
Fidelity Compare(const ModelSpec& spec, const ReplayResult& sparse, const ReplayResult& dense);

// Outputs against the generator's exact dense attention, every `stride`-th step from 0 to
// `steps`, every layer and head (a pass over the history per head: small sessions); out(step,
// layer) gives that request's [q_heads][head_dim] output.
struct ModelFit {
  double max_abs = 0, cosine = 0;  // largest elementwise error; cosine over all the samples
};
ModelFit CompareToModel(const workload::Session& g, uint32_t steps, uint32_t stride,
                        const std::function<const float*(uint32_t, uint32_t)>& out);

}  // namespace fm::replay
