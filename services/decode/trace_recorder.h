// Trace mode (DESIGN §3): a dense session that also records what the indexer's trainer
// needs — the index keys of every chunk, the hidden state and the queries at cycle starts,
// the dense attention mass per page at every step and the golden labels of every cycle —
// and writes it as a trace file (workload/trace.h format, readable by trainer/ and
// fm-bench) so that a deployment can train an indexer for its own model.
//
// Golden labels of a cycle: the union over its tau steps of the chunks that carry the top-p
// of the (head-averaged) attention mass in at least m layers; only chunks of pages sealed
// at the step count. The mass of each token comes from the step's own dense attention: the
// query against the token's key, normalised by the kernel's log-sum-exp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/model_spec.h"

namespace fm::decode {

struct TraceLabelOptions {
  double top_p = 0.6;
  uint32_t label_layers = 1;  // m
};

class TraceRecorder {
 public:
  TraceRecorder(const ModelSpec& spec, uint32_t tau, const TraceLabelOptions& labels);

  // Index keys of the next `chunks` chunks, [index_layer][chunks][di + 4].
  void AddKeys(const uint8_t* keys, uint64_t chunks);
  // The history length when decoding starts (the prefill).
  void StartDecoding(uint64_t tokens);
  void SetHidden(uint32_t step, absl::Span<const float> hidden);
  // One layer of a step's dense attention: the query [Hq][d], the kernel's log-sum-exp per
  // head, and the history's pages in order (payloads), the last holding `last_valid` tokens.
  void AddLayer(uint32_t step, uint32_t layer, const float* q, const float* lse,
                const std::vector<const uint8_t*>& pages, uint32_t last_valid);
  // Closes the step (after its last layer): labels of its cycle, page masses.
  void EndStep(uint32_t step);

  uint32_t steps() const { return steps_; }
  // Writes the trace of the steps so far (whole cycles only: the trainer reads cycles).
  absl::Status Write(const std::string& path) const;

 private:
  ModelSpec spec_;
  uint32_t tau_;
  TraceLabelOptions lo_;
  uint64_t prefill_tokens_ = 0;
  uint32_t steps_ = 0;
  std::vector<std::vector<uint8_t>> keys_;             // [index layer][chunks * (di + 4)]
  std::vector<std::vector<float>> hidden_;             // per step ([] when none came)
  std::vector<std::vector<float>> queries_;            // per cycle [L][Hq][d]
  std::vector<std::vector<float>> page_mass_;          // per step [pages at the step]
  std::vector<std::vector<uint64_t>> labels_;          // per cycle: labelled chunks
  std::vector<std::vector<double>> step_chunk_mass_;   // this step: [layer][chunk]
  std::vector<double> step_page_mass_;
};

// The file name a session's trace gets in the worker's trace directory: the id when it is
// made of [A-Za-z0-9._-] (and is not "." or ".."), else "=" + its hex; ".safetensors".
std::string TraceFileName(const std::string& session);
// Whether `name` is a plain file name: [A-Za-z0-9._-]+, not "." or "..".
bool IsPlainFileName(const std::string& name);

}  // namespace fm::decode
