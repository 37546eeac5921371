#include "workload/trace.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace fm::workload {

absl::Status WriteTrace(const Session& s, const std::string& path, const TraceOptions& o) {
  const bool with_pages = o.pages;
  const ModelSpec& sp = s.spec();
  const int64_t C = static_cast<int64_t>(s.total_chunks()),
                P = static_cast<int64_t>(s.total_pages());
  const int64_t K = s.cycles(), S = s.config().steps;
  std::vector<uint8_t> keys;
  for (uint32_t l = 0; l < sp.index_layers; ++l)
    keys.insert(keys.end(), s.index_keys(l).begin(), s.index_keys(l).end());
  std::vector<float> queries(size_t(K) * sp.layers * sp.q_heads * sp.head_dim);
  for (int64_t cy = 0; cy < K; ++cy)
    for (uint32_t l = 0; l < sp.layers; ++l)
      for (uint32_t h = 0; h < sp.q_heads; ++h)
        s.ModelQuery(
            static_cast<uint32_t>(cy * s.config().knobs.tau), l, h,
            queries.data() + ((size_t(cy) * sp.layers + l) * sp.q_heads + h) * sp.head_dim);
  std::vector<int64_t> needles;
  for (const Needle& n : s.needles())
    needles.insert(needles.end(), {int64_t(n.chunk), int64_t(n.step)});
  std::vector<int32_t> topics(s.chunk_topics().begin(), s.chunk_topics().end());
  std::vector<uint8_t> pages;
  if (with_pages) {
    pages.resize(size_t(P) * sp.PageBytes());
    for (int64_t p = 0; p < P; ++p) s.FillPage(p, pages.data() + size_t(p) * sp.PageBytes());
  }
  SafetensorsWriter w;
  w.Add("index_keys", StDType::kU8, {sp.index_layers, C, int64_t(sp.IndexKeyBytes())}, keys);
  w.Add("hidden", StDType::kF32, {S, sp.hidden_dim}, s.hidden(0));
  const size_t per_step = size_t{sp.layers} * sp.q_heads * sp.head_dim;
  std::vector<float> step_queries, outputs;
  if (o.step_queries || o.outputs) {
    if (o.step_queries) step_queries.resize(size_t(S) * per_step);
    if (o.outputs) outputs.resize(size_t(S) * per_step);
    for (int64_t st = 0; st < S; ++st)
      for (uint32_t l = 0; l < sp.layers; ++l)
        for (uint32_t h = 0; h < sp.q_heads; ++h) {
          const size_t at = size_t(st) * per_step + (size_t{l} * sp.q_heads + h) * sp.head_dim;
          if (o.step_queries)
            s.ModelQuery(static_cast<uint32_t>(st), l, h, step_queries.data() + at);
          if (o.outputs) s.DenseOutput(static_cast<uint32_t>(st), l, h, outputs.data() + at);
        }
  }
  if (o.step_queries)
    w.Add("step_queries", StDType::kF32, {S, sp.layers, sp.q_heads, sp.head_dim}, step_queries);
  if (o.outputs) w.Add("outputs", StDType::kF32, {S, sp.layers, sp.q_heads, sp.head_dim}, outputs);
  w.Add("queries", StDType::kF32, {K, sp.layers, sp.q_heads, sp.head_dim}, queries);
  w.Add("labels", StDType::kU8, {K, C}, s.labels(0));
  w.Add("page_mass", StDType::kF32, {S, P}, s.page_mass(0));
  w.Add("needles", StDType::kI64, {int64_t(s.needles().size()), 2}, needles);
  w.Add("chunk_topic", StDType::kI32, {C}, topics);
  if (with_pages) w.Add("pages", StDType::kU8, {P, int64_t(sp.PageBytes())}, pages);
  const SessionConfig& c = s.config();
  return w.Write(path, TraceMetadata(sp, {c.prefill_tokens, c.steps, c.knobs.tau, c.seed,
                                          c.knobs.world_seed, c.knobs.top_p,
                                          c.knobs.label_layers}));
}

std::map<std::string, std::string> TraceMetadata(const ModelSpec& sp, const TraceGeometry& g) {
  return {
      {"format", kTraceFormat},
      {"spec_name", sp.name},
      {"layers", absl::StrCat(sp.layers)},
      {"q_heads", absl::StrCat(sp.q_heads)},
      {"kv_heads", absl::StrCat(sp.kv_heads)},
      {"head_dim", absl::StrCat(sp.head_dim)},
      {"softmax_scale", absl::StrFormat("%.9g", sp.Scale())},
      {"dtype", DTypeName(sp.dtype)},
      {"page_tokens", absl::StrCat(sp.page_tokens)},
      {"index_layers", absl::StrCat(sp.index_layers)},
      {"index_heads", absl::StrCat(sp.index_heads)},
      {"index_dim", absl::StrCat(sp.index_dim)},
      {"chunk_tokens", absl::StrCat(sp.chunk_tokens)},
      {"hidden_dim", absl::StrCat(sp.hidden_dim)},
      {"rope_dims", absl::StrCat(IndexerShapeFor(sp, 1).rope_dims)},
      {"prefill_tokens", absl::StrCat(g.prefill_tokens)},
      {"steps", absl::StrCat(g.steps)},
      {"tau", absl::StrCat(g.tau)},
      {"seed", absl::StrCat(g.seed)},
      {"world_seed", absl::StrCat(g.world_seed)},
      {"top_p", absl::StrCat(g.top_p)},
      {"label_layers", absl::StrCat(g.label_layers)},
  };
}

absl::StatusOr<Trace> ReadTrace(const std::string& path) {
  Trace t;
  auto f = SafetensorsFile::Open(path);
  if (!f.ok()) return f.status();
  t.file = std::move(*f);
  const auto& m = t.file->metadata();
  auto field = [&](const char* name, auto* out) -> absl::Status {
    auto it = m.find(name);
    uint64_t v = 0;
    if (it == m.end() || !absl::SimpleAtoi(it->second, &v))
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": metadata field \"", name, "\" missing or not a number"));
    *out = static_cast<std::remove_pointer_t<decltype(out)>>(v);
    return absl::OkStatus();
  };
  auto it = m.find("format");
  if (it == m.end() || it->second != kTraceFormat)
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a ", kTraceFormat, " file"));
  ModelSpec& s = t.spec;
  s.name = m.count("spec_name") ? m.at("spec_name") : "";
  for (auto [name, out] : {std::pair{"layers", &s.layers},
                           {"q_heads", &s.q_heads},
                           {"kv_heads", &s.kv_heads},
                           {"head_dim", &s.head_dim},
                           {"page_tokens", &s.page_tokens},
                           {"index_layers", &s.index_layers},
                           {"index_heads", &s.index_heads},
                           {"index_dim", &s.index_dim},
                           {"chunk_tokens", &s.chunk_tokens},
                           {"hidden_dim", &s.hidden_dim},
                           {"steps", &t.steps},
                           {"tau", &t.tau}})
    if (absl::Status st = field(name, out); !st.ok()) return st;
  if (absl::Status st = field("prefill_tokens", &t.prefill_tokens); !st.ok()) return st;
  auto dt = ParseDType(m.count("dtype") ? m.at("dtype") : "");
  if (!dt.ok()) return dt.status();
  s.dtype = *dt;
  if (absl::Status st = s.Validate(); !st.ok()) return st;
  if (t.tau == 0 || t.steps % t.tau != 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": steps not whole cycles"));
  t.cycles = t.steps / t.tau;
  t.chunks = (t.prefill_tokens + t.steps + s.chunk_tokens - 1) / s.chunk_tokens;
  t.pages = s.PagesForTokens(t.prefill_tokens + t.steps);
  const int64_t C = t.chunks, P = t.pages, K = t.cycles;
  auto get = [&](const char* name, StDType dt2, std::vector<int64_t> shape, TensorView* out) {
    auto v = t.file->Get(name, dt2, shape);
    if (!v.ok()) return v.status();
    *out = *v;
    return absl::OkStatus();
  };
  for (absl::Status st :
       {get("index_keys", StDType::kU8, {s.index_layers, C, int64_t(s.IndexKeyBytes())},
            &t.index_keys),
        get("hidden", StDType::kF32, {t.steps, s.hidden_dim}, &t.hidden),
        get("queries", StDType::kF32, {K, s.layers, s.q_heads, s.head_dim}, &t.queries),
        get("labels", StDType::kU8, {K, C}, &t.labels),
        get("page_mass", StDType::kF32, {t.steps, P}, &t.page_mass),
        get("needles", StDType::kI64, {-1, 2}, &t.needles)})
    if (!st.ok()) return st;
  return t;
}

}  // namespace fm::workload
