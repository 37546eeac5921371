// Trace files (DESIGN §4): one safetensors file per session with a JSON-string metadata
// block. Tensors (C chunks, P pages, S decode steps, K = S / tau cycles):
//   index_keys  U8  [Li, C, di + 4]   compressed index keys (fp8-e4m3 + fp32 scale)
//   hidden      F32 [S, hidden_dim]   hidden state at each step (read at cycle starts)
//   queries     F32 [K, L, Hq, d]     the model's decode queries at each cycle start
//   labels      U8  [K, C]            golden labels of each cycle (DESIGN §3)
//   page_mass   F32 [S, P]            head- and layer-averaged dense attention per page
//   needles     I64 [n, 2]            (chunk, retrieval step) of each needle
//   chunk_topic I32 [C]               topic of each chunk (-1: sink or needle), for analysis
//   pages       U8  [P, page_bytes]   K/V payloads (optional)
//   step_queries F32 [S, L, Hq, d]    the model's decode queries at every step (optional)
//   outputs     F32 [S, L, Hq, d]     dense attention outputs at every step (optional; a
//                                     pass over the history per step and head)
// Metadata: format = flashmemory-trace-v1, the model spec fields, prefill_tokens, steps,
// tau, seed, world_seed. trainer/fm_trace.py reads the same files with NumPy.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "common/safetensors.h"
#include "workload/generator.h"

namespace fm::workload {

inline constexpr char kTraceFormat[] = "flashmemory-trace-v1";

struct TraceOptions {
  bool pages = false;
  bool step_queries = false;
  bool outputs = false;
};

// The metadata block every trace carries: format, the spec's fields and the geometry.
struct TraceGeometry {
  uint64_t prefill_tokens = 0;
  uint32_t steps = 0, tau = 0;
  uint64_t seed = 0, world_seed = 0;
  double top_p = 0.6;
  uint32_t label_layers = 1;
};
std::map<std::string, std::string> TraceMetadata(const ModelSpec& spec, const TraceGeometry& g);

absl::Status WriteTrace(const Session& session, const std::string& path,
                        const TraceOptions& options = {});

// A trace opened for reading: the spec and geometry from its metadata, tensors as views.
struct Trace {
  std::unique_ptr<SafetensorsFile> file;
  ModelSpec spec;
  uint64_t prefill_tokens = 0;
  uint32_t steps = 0, tau = 0, cycles = 0;
  uint64_t chunks = 0, pages = 0;
  TensorView index_keys, hidden, queries, labels, page_mass, needles;

  uint64_t tokens_at(uint32_t step) const { return prefill_tokens + step + 1; }
  uint64_t pages_at(uint32_t step) const { return spec.PagesForTokens(tokens_at(step)); }
  uint64_t indexed_chunks(uint32_t step) const {
    return tokens_at(step) / spec.page_tokens * spec.ChunksPerPage();
  }
  const uint8_t* keys(uint32_t layer) const {
    return index_keys.data + size_t{layer} * chunks * spec.IndexKeyBytes();
  }
  const float* hidden_at(uint32_t step) const {
    return reinterpret_cast<const float*>(hidden.data) + size_t{step} * spec.hidden_dim;
  }
  const float* queries_at(uint32_t cycle) const {
    return reinterpret_cast<const float*>(queries.data) +
           size_t{cycle} * spec.layers * spec.q_heads * spec.head_dim;
  }
  const uint8_t* labels_at(uint32_t cycle) const { return labels.data + size_t{cycle} * chunks; }
  const float* page_mass_at(uint32_t step) const {
    return reinterpret_cast<const float*>(page_mass.data) + size_t{step} * pages;
  }
};

// NOT_FOUND for a missing file; INVALID_ARGUMENT naming the field for anything malformed.
absl::StatusOr<Trace> ReadTrace(const std::string& path);

}  // namespace fm::workload
