#include "services/decode/trace_recorder.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "workload/trace.h"

namespace fm::decode {

TraceRecorder::TraceRecorder(const ModelSpec& spec, uint32_t tau, const TraceLabelOptions& labels)
    : spec_(spec), tau_(tau), lo_(labels), keys_(spec.index_layers) {}

void TraceRecorder::AddKeys(const uint8_t* keys, uint64_t chunks) {
  const size_t kb = spec_.IndexKeyBytes();
  for (uint32_t l = 0; l < spec_.index_layers; ++l)
    keys_[l].insert(keys_[l].end(), keys + size_t{l} * chunks * kb,
                    keys + (size_t{l} * chunks + chunks) * kb);
}

void TraceRecorder::StartDecoding(uint64_t tokens) {
  if (steps_ == 0) prefill_tokens_ = tokens;
}

void TraceRecorder::SetHidden(uint32_t step, absl::Span<const float> hidden) {
  if (hidden_.size() <= step) hidden_.resize(step + 1);
  hidden_[step].assign(hidden.begin(), hidden.end());
}

void TraceRecorder::AddLayer(uint32_t step, uint32_t layer, const float* q, const float* lse,
                             const std::vector<const uint8_t*>& pages, uint32_t last_valid) {
  const ModelSpec& sp = spec_;
  const uint32_t P = sp.page_tokens, D = sp.head_dim, group = sp.q_heads / sp.kv_heads;
  const uint64_t tokens = (pages.size() - 1) * uint64_t{P} + last_valid;
  const uint64_t nch = (tokens + sp.chunk_tokens - 1) / sp.chunk_tokens;
  if (layer == 0) {
    step_chunk_mass_.assign(sp.layers, std::vector<double>(nch, 0.0));
    step_page_mass_.assign(pages.size(), 0.0);
  }
  if (step % tau_ == 0) {
    const uint32_t cycle = step / tau_;
    if (queries_.size() <= cycle) queries_.resize(cycle + 1);
    queries_[cycle].resize(size_t{sp.layers} * sp.q_heads * D);
    std::copy(q, q + size_t{sp.q_heads} * D, queries_[cycle].data() + size_t{layer} * sp.q_heads * D);
  }
  const float scale = sp.Scale();
  const size_t es = DTypeSize(sp.dtype);
  std::vector<float> k(size_t{P} * D);
  std::vector<double>& cm = step_chunk_mass_[layer];
  const double per_head = 1.0 / sp.q_heads, per_layer = per_head / sp.layers;
  for (size_t i = 0; i < pages.size(); ++i) {
    const uint32_t valid = i + 1 == pages.size() ? last_valid : P;
    for (uint32_t kv = 0; kv < sp.kv_heads; ++kv) {
      LoadFloats(sp.dtype, pages[i] + sp.ElemOffset(layer, 0, kv, 0) * es, k.data(),
                 size_t{valid} * D);
      for (uint32_t r = 0; r < valid; ++r) {
        const float* kr = k.data() + size_t{r} * D;
        double p = 0;
        for (uint32_t h = kv * group; h < (kv + 1) * group; ++h) {
          const float* qh = q + size_t{h} * D;
          float dot = 0;
          for (uint32_t j = 0; j < D; ++j) dot += qh[j] * kr[j];
          p += std::exp(double(dot) * scale - lse[h]);
        }
        const uint64_t pos = i * uint64_t{P} + r;
        cm[pos / sp.chunk_tokens] += p * per_head;
        step_page_mass_[i] += p * per_layer;
      }
    }
  }
}

void TraceRecorder::EndStep(uint32_t step) {
  const ModelSpec& sp = spec_;
  const uint32_t cycle = step / tau_;
  // Chunks indexed at the cycle start: those of the pages sealed by then.
  const uint64_t start_tokens = prefill_tokens_ + uint64_t{cycle} * tau_ + 1;
  const uint64_t label_chunks = start_tokens / sp.page_tokens * sp.ChunksPerPage();
  if (labels_.size() <= cycle) labels_.resize(cycle + 1);
  std::vector<uint64_t>& lab = labels_[cycle];
  const uint64_t nch = step_chunk_mass_.empty() ? 0 : step_chunk_mass_[0].size();
  std::vector<uint32_t> votes(nch, 0);
  std::vector<uint64_t> order;
  for (uint32_t l = 0; l < sp.layers && nch > 0; ++l) {
    const std::vector<double>& m = step_chunk_mass_[l];
    // The sink first, then by mass: the prefix holding top_p of the mass.
    order.resize(nch - 1);
    std::iota(order.begin(), order.end(), uint64_t{1});
    std::sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) {
      return m[a] != m[b] ? m[a] > m[b] : a < b;
    });
    double cum = m[0];
    for (size_t i = 0; i < order.size() && cum < lo_.top_p; ++i) {
      ++votes[order[i]];
      cum += m[order[i]];
    }
  }
  lab.push_back(0);
  for (uint64_t j = 1; j < std::min(nch, label_chunks); ++j)
    if (votes[j] >= lo_.label_layers) lab.push_back(j);
  std::sort(lab.begin(), lab.end());
  lab.erase(std::unique(lab.begin(), lab.end()), lab.end());
  if (page_mass_.size() <= step) page_mass_.resize(step + 1);
  page_mass_[step].assign(step_page_mass_.begin(), step_page_mass_.end());
  steps_ = std::max(steps_, step + 1);
}

absl::Status TraceRecorder::Write(const std::string& path) const {
  const ModelSpec& sp = spec_;
  const int64_t K = steps_ / tau_, S = K * tau_;
  if (K == 0)
    return absl::FailedPreconditionError(
        absl::StrCat("a trace needs a whole cycle of ", tau_, " steps; the session decoded ",
                     steps_));
  const size_t kb = sp.IndexKeyBytes();
  const int64_t C = static_cast<int64_t>(keys_[0].size() / kb);
  const int64_t P = static_cast<int64_t>(sp.PagesForTokens(prefill_tokens_ + S));
  std::vector<uint8_t> keys;
  for (const auto& k : keys_) keys.insert(keys.end(), k.begin(), k.end());
  std::vector<float> hidden(size_t(S) * sp.hidden_dim, 0.0f);
  for (int64_t st = 0; st < S && st < int64_t(hidden_.size()); ++st)
    std::copy(hidden_[st].begin(), hidden_[st].end(), hidden.begin() + st * sp.hidden_dim);
  const size_t qs = size_t{sp.layers} * sp.q_heads * sp.head_dim;
  std::vector<float> queries(size_t(K) * qs, 0.0f);
  for (int64_t c = 0; c < K; ++c)
    std::copy(queries_[c].begin(), queries_[c].end(), queries.begin() + c * qs);
  std::vector<uint8_t> labels(size_t(K) * C, 0);
  for (int64_t c = 0; c < K; ++c)
    for (uint64_t j : labels_[c])
      if (int64_t(j) < C) labels[c * C + j] = 1;
  std::vector<float> page_mass(size_t(S) * P, 0.0f);
  for (int64_t st = 0; st < S; ++st)
    for (size_t p = 0; p < page_mass_[st].size() && int64_t(p) < P; ++p)
      page_mass[st * P + p] = static_cast<float>(page_mass_[st][p]);
  const std::vector<int64_t> needles;  // a model's trace knows no needles
  const std::vector<int32_t> topics(C, -1);
  SafetensorsWriter w;
  w.Add("index_keys", StDType::kU8, {sp.index_layers, C, int64_t(kb)}, keys);
  w.Add("hidden", StDType::kF32, {S, sp.hidden_dim}, hidden);
  w.Add("queries", StDType::kF32, {K, sp.layers, sp.q_heads, sp.head_dim}, queries);
  w.Add("labels", StDType::kU8, {K, C}, labels);
  w.Add("page_mass", StDType::kF32, {S, P}, page_mass);
  w.Add("needles", StDType::kI64, {0, 2}, needles);
  w.Add("chunk_topic", StDType::kI32, {C}, topics);
  std::map<std::string, std::string> meta = workload::TraceMetadata(
      sp, {prefill_tokens_, static_cast<uint32_t>(S), tau_, 0, 0, lo_.top_p, lo_.label_layers});
  meta["source"] = "decode worker (trace mode)";
  return w.Write(path, meta);
}

bool IsPlainFileName(const std::string& name) {
  bool plain = !name.empty() && name != "." && name != "..";
  for (char c : name)
    plain = plain && (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                      c == '-');
  return plain;
}

std::string TraceFileName(const std::string& session) {
  const bool plain = IsPlainFileName(session);
  std::string name = "=";  // not in plain names
  if (plain) {
    name = session;
  } else {
    static const char kHex[] = "0123456789abcdef";
    for (unsigned char c : session) name += {kHex[c >> 4], kHex[c & 15]};
  }
  return name + ".safetensors";
}

}  // namespace fm::decode
