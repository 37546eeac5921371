#include "tools/replay/replay.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace fm::replay {
namespace v1 = flashmemory::v1;

PrefillData MakePrefill(const workload::Session& g) {
  const ModelSpec& sp = g.spec();
  const uint64_t tokens = g.config().prefill_tokens;
  PrefillData d;
  d.n_pages = sp.PagesForTokens(tokens);
  d.chunks = tokens / sp.chunk_tokens;
  d.pages.resize(d.n_pages * sp.PageBytes());
  for (uint64_t p = 0; p < d.n_pages; ++p) g.FillPage(p, d.pages.data() + p * sp.PageBytes());
  const size_t kb = sp.IndexKeyBytes();
  for (uint32_t l = 0; l < sp.index_layers; ++l)
    d.keys.insert(d.keys.end(), g.index_keys(l).begin(), g.index_keys(l).begin() + d.chunks * kb);
  return d;
}

v1::LayerRequest StepSource::Request(uint32_t step, uint32_t layer, uint32_t layer_count) {
  const ModelSpec& sp = g_.spec();
  const uint64_t pos = g_.position(step), P = sp.page_tokens;
  if (pos / P != cached_page_) {
    page_.resize(sp.PageBytes());
    g_.FillPage(pos / P, page_.data());
    cached_page_ = pos / P;
  }
  v1::LayerRequest r;
  r.set_session_id(id_);
  r.set_step(step);
  r.set_layer(layer);
  r.set_layer_count(layer_count);
  const uint32_t d = sp.head_dim;
  const size_t es = DTypeSize(sp.dtype);
  std::vector<float> q(size_t{layer_count} * sp.q_heads * d);
  std::string* k = r.mutable_k();
  std::string* v = r.mutable_v();
  for (uint32_t j = 0; j < layer_count; ++j) {
    for (uint32_t h = 0; h < sp.q_heads; ++h)
      g_.ModelQuery(step, layer + j, h, q.data() + (size_t{j} * sp.q_heads + h) * d);
    for (uint32_t h = 0; h < sp.kv_heads; ++h) {
      k->append(reinterpret_cast<const char*>(page_.data() +
                                              sp.ElemOffset(layer + j, 0, h, pos % P) * es),
                d * es);
      v->append(reinterpret_cast<const char*>(page_.data() +
                                              sp.ElemOffset(layer + j, 1, h, pos % P) * es),
                d * es);
    }
  }
  r.set_q(q.data(), q.size() * 4);
  if (layer == 0) {
    if (step % tau_ == 0) r.set_hidden(g_.hidden(step), size_t{sp.hidden_dim} * 4);
    if ((pos + 1) % sp.chunk_tokens == 0) {
      const uint64_t c = pos / sp.chunk_tokens;
      const size_t kb = sp.IndexKeyBytes();
      v1::IndexKeys* ik = r.mutable_index_keys();
      ik->set_first_chunk(c);
      ik->set_chunks(1);
      for (uint32_t l = 0; l < sp.index_layers; ++l)
        ik->mutable_data()->append(reinterpret_cast<const char*>(g_.index_keys(l).data() + c * kb),
                                   kb);
    }
  }
  return r;
}

absl::Status OpenAndPrefill(decode::DecodeClient& client, const workload::Session& g,
                            const PrefillData& prefill, const ReplayOptions& o, ReplayResult* res) {
  const ModelSpec& sp = g.spec();
  decode::SessionOptions so;
  so.spec = sp;
  so.mode = o.mode;
  so.budget = o.budget;
  so.policy = o.policy;
  so.miss_ratio = o.miss_ratio;
  so.tau = g.config().knobs.tau;
  so.max_tokens = g.config().prefill_tokens + g.config().steps;
  auto opened = client.Open(o.session_id, so);
  if (!opened.ok()) return opened.status();
  auto t0 = std::chrono::steady_clock::now();
  if (absl::Status st =
          client.Prefill(o.session_id, sp, prefill.pages.data(), prefill.n_pages,
                         g.config().prefill_tokens, prefill.keys.data(), prefill.chunks);
      !st.ok())
    return st;
  res->prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::Status DecodeSteps(decode::DecodeClient& client, decode::DecodeClient::Stream& stream,
                         const workload::Session& g, const std::string& id, uint32_t begin,
                         uint32_t end, bool whole_step, ReplayResult* res) {
  const ModelSpec& sp = g.spec();
  const uint32_t steps = g.config().steps, L = sp.layers;
  const size_t qs = size_t{sp.q_heads} * sp.head_dim;
  res->out.resize(size_t{steps} * L * qs);
  res->lse.resize(size_t{steps} * L * sp.q_heads);
  StepSource src(g, id, g.config().knobs.tau);
  double decode_ms = 0;
  for (uint32_t st = begin; st < end; ++st) {
    // Requests are built before the clock starts: the engine has them in hand.
    std::vector<v1::DecodeBatch> batches;
    if (whole_step) {
      batches.emplace_back();
      *batches.back().add_requests() = src.Request(st, 0, L);
    } else {
      for (uint32_t l = 0; l < L; ++l) {
        batches.emplace_back();
        *batches.back().add_requests() = src.Request(st, l, 1);
      }
    }
    const auto s0 = std::chrono::steady_clock::now();
    bool stalled = false;
    for (const auto& b : batches) {
      auto r = stream.Run(b);
      if (!r.ok()) return r.status();
      for (const v1::LayerResult& lr : r->results()) {
        if (lr.code() != 0)
          return absl::Status(static_cast<absl::StatusCode>(lr.code()),
                              absl::StrCat("step ", st, " layer ", lr.layer(), ": ", lr.message()));
        const uint32_t n = std::max<uint32_t>(1, lr.layer_count());
        std::memcpy(res->out.data() + (size_t{st} * L + lr.layer()) * qs, lr.out().data(),
                    n * qs * 4);
        std::memcpy(res->lse.data() + (size_t{st} * L + lr.layer()) * sp.q_heads, lr.lse().data(),
                    size_t{n} * sp.q_heads * 4);
        stalled |= lr.stalled();
      }
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
    res->step_ms.push_back(ms);
    decode_ms += ms;
    if (stalled) res->stalled_at.push_back(st);
    // Needles retrieved at this step, then the missed ones still watched: one probe.
    std::vector<uint64_t> probe_pages;
    for (const auto& n : g.needles())
      if (n.step == st) probe_pages.push_back(n.chunk / sp.ChunksPerPage());
    const size_t fresh = probe_pages.size();
    for (const auto& [page, step] : res->watching) probe_pages.push_back(page);
    if (!probe_pages.empty()) {
      auto probe = client.Stats(id, probe_pages);
      if (!probe.ok()) return probe.status();
      if (static_cast<size_t>(probe->probe_resident_size()) != probe_pages.size())
        return absl::InternalError("the worker answered a probe with another page count");
      std::vector<std::pair<uint64_t, uint32_t>> still;
      for (size_t i = 0; i < probe_pages.size(); ++i) {
        const bool resident = probe->probe_resident(static_cast<int>(i));
        if (i < fresh) {
          ++res->needles;
          res->needle_hits += resident;
          if (!resident) {
            still.push_back({probe_pages[i], st});
            res->needle_miss_cycle_steps.push_back(st % g.config().knobs.tau);
          }
          continue;
        }
        const uint32_t since = res->watching[i - fresh].second;
        if (resident)
          res->needle_recovery_steps.push_back(static_cast<int>(st - since));
        else if (st - since >= kNeedleWatchSteps)
          res->needle_recovery_steps.push_back(-1);
        else
          still.push_back(res->watching[i - fresh]);
      }
      res->watching = std::move(still);
    }
  }
  if (end == g.config().steps) {  // the session ends: what is still watched was not recovered
    for (size_t i = 0; i < res->watching.size(); ++i) res->needle_recovery_steps.push_back(-1);
    res->watching.clear();
  }
  res->decode_s += decode_ms / 1000;
  return absl::OkStatus();
}

absl::StatusOr<ReplayResult> Replay(decode::DecodeClient& client, const workload::Session& g,
                                    const PrefillData& prefill, const ReplayOptions& o) {
  ReplayResult res;
  if (absl::Status st = OpenAndPrefill(client, g, prefill, o, &res); !st.ok()) return st;
  auto stream = client.OpenStream();
  if (absl::Status st =
          DecodeSteps(client, *stream, g, o.session_id, 0, g.config().steps, o.whole_step, &res);
      !st.ok())
    return st;
  if (absl::Status st = stream->Finish(); !st.ok()) return st;
  auto stats = client.Stats(o.session_id);
  if (!stats.ok()) return stats.status();
  res.stats = *stats;
  if (o.close)
    if (absl::Status st = client.Close(o.session_id); !st.ok()) return st;
  return res;
}

Fidelity Compare(const ModelSpec& sp, const ReplayResult& a, const ReplayResult& b) {
  Fidelity f;
  const size_t d = sp.head_dim, n = a.lse.size();
  double recall = 0;
  for (size_t i = 0; i < n; ++i) {
    const float* x = a.out.data() + i * d;
    const float* y = b.out.data() + i * d;
    double xy = 0, xx = 0, yy = 0, diff = 0;
    for (size_t j = 0; j < d; ++j) {
      xy += double(x[j]) * y[j], xx += double(x[j]) * x[j], yy += double(y[j]) * y[j];
      diff += (double(x[j]) - y[j]) * (double(x[j]) - y[j]);
    }
    const double cos = xx > 0 && yy > 0 ? xy / std::sqrt(xx * yy) : (xx == yy ? 1.0 : 0.0);
    f.cosine_mean += cos;
    f.cosine_min = std::min(f.cosine_min, cos);
    f.rel_l2_mean += yy > 0 ? std::sqrt(diff / yy) : 0;
    recall += std::min(1.0, std::exp(double(a.lse[i]) - b.lse[i]));
  }
  if (n) f.cosine_mean /= n, f.rel_l2_mean /= n, f.mass_recall = recall / n;
  return f;
}

ModelFit CompareToModel(const workload::Session& g, uint32_t steps, uint32_t stride,
                        const std::function<const float*(uint32_t, uint32_t)>& out) {
  const ModelSpec& sp = g.spec();
  ModelFit f;
  std::vector<float> ref(sp.head_dim);
  double dot = 0, na = 0, nb = 0;
  for (uint32_t st = 0; st < steps; st += stride)
    for (uint32_t l = 0; l < sp.layers; ++l)
      for (uint32_t h = 0; h < sp.q_heads; ++h) {
        g.DenseOutput(st, l, h, ref.data());
        const float* o = out(st, l) + size_t{h} * sp.head_dim;
        for (uint32_t i = 0; i < sp.head_dim; ++i) {
          f.max_abs = std::max(f.max_abs, double(std::abs(o[i] - ref[i])));
          dot += double(o[i]) * ref[i], na += double(o[i]) * o[i], nb += double(ref[i]) * ref[i];
        }
      }
  f.cosine = na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0;
  return f;
}

}  // namespace fm::replay
