#include "services/decode/decode_service.h"

#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/codecs.h"
#include "common/grpc_server.h"
#include "common/spec_proto.h"
#include "common/status.h"
#include "flashmemory/kernels/indexer.h"
#include "services/decode/session_proto.h"

namespace fm::decode {
namespace v1 = flashmemory::v1;
namespace {

// Pages a prefill stream: raw K/V token ranges into whole pages, keys into chunks.
class PrefillReader : public grpc::ServerReadReactor<v1::PrefillChunk> {
 public:
  // scope: the caller's tenant (its session ids are scoped by it); denied: finish at once.
  PrefillReader(DecodeCore* core, v1::PrefillResponse* resp, absl::StatusOr<Identity> who)
      : core_(core), resp_(resp) {
    if (!who.ok()) {
      grpc::ServerReadReactor<v1::PrefillChunk>::Finish(ToGrpcStatus(who.status()));
      return;
    }
    who_ = *who;
    StartRead(&chunk_);
  }
  void OnReadDone(bool ok) override {
    absl::Status st = ok ? Consume() : Finish();
    if (!st.ok() || !ok) {
      grpc::ServerReadReactor<v1::PrefillChunk>::Finish(ToGrpcStatus(st));
      return;
    }
    StartRead(&chunk_);
  }
  void OnDone() override { delete this; }

 private:
  absl::Status Start(const std::string& id) {
    id_ = id;
    auto spec = core_->SessionSpec(id);
    if (!spec.ok()) return spec.status();
    spec_ = *spec;
    auto stats = core_->Stats(id);
    if (!stats.ok()) return stats.status();
    tokens_ = sent_tokens_ = stats->tokens;
    if (tokens_ % spec_.page_tokens != 0)
      return absl::FailedPreconditionError("the session's history already ends in a partial page");
    page_.assign(spec_.PageBytes(), 0);
    keys_.assign(spec_.index_layers, {});
    key_chunk_ = sent_chunks_ = tokens_ / spec_.chunk_tokens;
    return absl::OkStatus();
  }

  absl::Status Consume() {
    const v1::PrefillChunk& c = chunk_;
    if (id_.empty()) {
      if (c.session_id().empty())
        return absl::InvalidArgumentError("the first prefill message must name the session");
      if (absl::Status st = Start(ScopedSessionId(who_, c.session_id())); !st.ok()) return st;
    } else if (!c.session_id().empty() && ScopedSessionId(who_, c.session_id()) != id_) {
      return absl::InvalidArgumentError("one prefill stream carries one session");
    }
    const ModelSpec& sp = spec_;
    // Keys first: a page flushed by this message's tokens carries its own chunks' keys.
    if (c.has_index_keys() && c.index_keys().chunks() > 0) {
      const v1::IndexKeys& k = c.index_keys();
      if (k.first_chunk() != key_chunk_)
        return absl::InvalidArgumentError(
            absl::StrCat("index keys start at chunk ", k.first_chunk(), "; expected ", key_chunk_));
      const size_t kb = sp.IndexKeyBytes(), want = size_t{sp.index_layers} * k.chunks() * kb;
      if (k.data().size() != want)
        return absl::InvalidArgumentError(absl::StrCat("index keys carry ", k.data().size(),
                                                       " bytes; expected [", sp.index_layers, "][",
                                                       k.chunks(), "][", kb, "] = ", want));
      for (uint32_t l = 0; l < sp.index_layers; ++l)
        keys_[l].append(k.data(), size_t{l} * k.chunks() * kb, size_t{k.chunks()} * kb);
      key_chunk_ += k.chunks();
    } else if (!c.raw_index_keys().empty()) {
      const size_t per = size_t{sp.index_layers} * sp.index_dim * 4;
      if (c.raw_index_keys().size() % per != 0)
        return absl::InvalidArgumentError(
            absl::StrCat("raw index keys carry ", c.raw_index_keys().size(), " bytes; expected [",
                         sp.index_layers, "][chunks][", sp.index_dim, "] fp32"));
      const uint64_t n = c.raw_index_keys().size() / per;
      std::vector<float> raw(c.raw_index_keys().size() / 4);
      std::memcpy(raw.data(), c.raw_index_keys().data(), c.raw_index_keys().size());
      std::string key(sp.IndexKeyBytes(), '\0');
      for (uint32_t l = 0; l < sp.index_layers; ++l)
        for (uint64_t j = 0; j < n; ++j) {
          kernels::CompressIndexKey(sp.index_dim, raw.data() + (l * n + j) * sp.index_dim,
                                    reinterpret_cast<uint8_t*>(key.data()));
          keys_[l] += key;
        }
      key_chunk_ += n;
    }
    if (c.tokens() > 0) {
      if (c.first_token() != tokens_)
        return absl::InvalidArgumentError(
            absl::StrCat("tokens start at ", c.first_token(), "; the session expects ", tokens_));
      const size_t es = DTypeSize(sp.dtype), row = size_t{sp.head_dim} * es;
      const size_t want = size_t{2} * sp.layers * sp.kv_heads * c.tokens() * row;
      if (c.kv().size() != want)
        return absl::InvalidArgumentError(absl::StrCat(
            "kv carries ", c.kv().size(), " bytes; expected [", sp.layers, "][2][", sp.kv_heads,
            "][", c.tokens(), "][", sp.head_dim, "] ", DTypeName(sp.dtype), " = ", want));
      const auto* kv = reinterpret_cast<const uint8_t*>(c.kv().data());
      for (uint32_t t = 0; t < c.tokens(); ++t) {
        const uint32_t slot = static_cast<uint32_t>(tokens_ % sp.page_tokens);
        for (uint32_t l = 0; l < sp.layers; ++l)
          for (uint32_t k = 0; k < 2; ++k)
            for (uint32_t h = 0; h < sp.kv_heads; ++h) {
              const size_t src = (((size_t{l} * 2 + k) * sp.kv_heads + h) * c.tokens() + t) * row;
              std::memcpy(page_.data() + sp.ElemOffset(l, k, h, slot) * es, kv + src, row);
            }
        ++tokens_;
        if (tokens_ % sp.page_tokens == 0)
          if (absl::Status st = Flush(); !st.ok()) return st;
      }
    }
    return absl::OkStatus();
  }

  // Hands the buffered page (full, or the last partial one) to the core with the keys of
  // the chunks it completes.
  absl::Status Flush(bool page = true) {
    const ModelSpec& sp = spec_;
    const uint64_t covered = std::min(key_chunk_, tokens_ / sp.chunk_tokens);
    const uint64_t n = covered - sent_chunks_;
    const size_t kb = sp.IndexKeyBytes();
    std::vector<uint8_t> keys;
    for (uint32_t l = 0; l < sp.index_layers; ++l) {
      keys.insert(keys.end(), keys_[l].begin(), keys_[l].begin() + n * kb);
      keys_[l].erase(0, n * kb);
    }
    absl::Status st = core_->Prefill(id_, page_.data(), 1, tokens_, keys.data(), sent_chunks_, n);
    if (!st.ok()) return st;
    sent_chunks_ += n;
    sent_tokens_ = tokens_;
    std::fill(page_.begin(), page_.end(), 0);
    return absl::OkStatus();
  }

  absl::Status Finish() {
    if (id_.empty()) return absl::InvalidArgumentError("an empty prefill stream");
    if (tokens_ > sent_tokens_)
      if (absl::Status st = Flush(); !st.ok()) return st;
    if (key_chunk_ > sent_chunks_ && tokens_ / spec_.chunk_tokens > sent_chunks_)
      if (absl::Status st = Flush(false); !st.ok()) return st;
    if (key_chunk_ > sent_chunks_)
      return absl::InvalidArgumentError(
          absl::StrCat("index keys for ", key_chunk_, " chunks but tokens for ", sent_chunks_));
    resp_->set_tokens(tokens_);
    resp_->set_pages(spec_.PagesForTokens(tokens_));
    return absl::OkStatus();
  }

  DecodeCore* core_;
  v1::PrefillResponse* resp_;
  Identity who_;
  v1::PrefillChunk chunk_;
  std::string id_;
  ModelSpec spec_;
  uint64_t tokens_ = 0, sent_tokens_ = 0, key_chunk_ = 0, sent_chunks_ = 0;
  std::vector<uint8_t> page_;
  std::vector<std::string> keys_;  // [index layer]: buffered keys from sent_chunks_
};

// A request refused for what the client sent (an unknown or foreign session, a malformed
// request, a session that moved): the throttle charges these, never the worker's own
// failures (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, ...).
bool RefusedByClientFault(const absl::Status& st) {
  switch (st.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kOutOfRange:
      return true;
    default:
      return false;
  }
}

// What a call refused before its first message (unauthenticated) is charged.
constexpr uint64_t kDeniedCallBytes = 4096;

// Runs batches of layer requests: read, run, answer (after the refusal throttle, when the
// batch's refused requests overdraw it), read the next.
class StepStream : public grpc::ServerBidiReactor<v1::DecodeBatch, v1::DecodeResults> {
 public:
  StepStream(DecodeCore* core, RefusalThrottle* throttle, absl::StatusOr<Identity> who)
      : core_(core), throttle_(throttle) {
    if (!who.ok()) {
      throttle_->Charge(kDeniedCallBytes, [this, st = who.status()] { Finish(ToGrpcStatus(st)); });
      return;
    }
    who_ = *who;
    StartRead(&batch_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    if (const uint32_t max = core_->options().max_batch_requests;
        static_cast<uint32_t>(batch_.requests_size()) > max) {
      grpc::Status st(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat("a batch of ", batch_.requests_size(),
                                   " requests; the limit is ", max, " (--max_batch_requests)"));
      throttle_->Charge(batch_.ByteSizeLong(), [this, st] { Finish(st); });
      return;
    }
    const uint64_t refused = Run();
    throttle_->Charge(refused, [this] { StartWrite(&results_); });
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::CANCELLED);
      return;
    }
    StartRead(&batch_);
  }
  void OnDone() override { delete this; }

 private:
  // Per request: its layers' core requests and their buffers.
  struct Item {
    absl::Status status;
    ModelSpec spec;
    uint32_t first = 0, count = 0;  // core requests [first, first + count)
    std::vector<float> q, k, v, hidden, out, lse;
    bool stalled = false;
  };

  absl::StatusOr<ModelSpec> Spec(const std::string& id) {
    auto it = specs_.find(id);
    if (it != specs_.end()) return it->second;
    auto sp = core_->SessionSpec(id);
    if (sp.ok() && specs_.size() < 4096) specs_[id] = *sp;
    return sp;
  }

  absl::Status Prepare(const v1::LayerRequest& r, Item& it) {
    auto sp = Spec(ScopedSessionId(who_, r.session_id()));
    if (!sp.ok()) return sp.status();
    it.spec = *sp;
    const ModelSpec& s = it.spec;
    const uint32_t n = std::max<uint32_t>(1, r.layer_count());
    if (r.layer() + n > s.layers)
      return absl::InvalidArgumentError(absl::StrCat("layers [", r.layer(), ", ", r.layer() + n,
                                                     ") out of range: the spec has ", s.layers));
    const size_t qn = size_t{n} * s.q_heads * s.head_dim, kn = size_t{n} * s.kv_heads * s.head_dim;
    const size_t es = DTypeSize(s.dtype);
    if (r.q().size() != qn * 4 || r.k().size() != kn * es || r.v().size() != kn * es)
      return absl::InvalidArgumentError(
          absl::StrCat("request has q ", r.q().size(), ", k ", r.k().size(), ", v ", r.v().size(),
                       " bytes; expected q [", n, "][", s.q_heads, "][", s.head_dim,
                       "] fp32 = ", qn * 4, ", k and v [", n, "][", s.kv_heads, "][", s.head_dim,
                       "] ", DTypeName(s.dtype), " = ", kn * es));
    if (!r.hidden().empty() && r.hidden().size() != size_t{s.hidden_dim} * 4)
      return absl::InvalidArgumentError(absl::StrCat("hidden has ", r.hidden().size(),
                                                     " bytes; expected hidden_dim ", s.hidden_dim,
                                                     " fp32 = ", s.hidden_dim * 4));
    if (r.has_index_keys() && r.index_keys().chunks() > 1)
      return absl::InvalidArgumentError("a step completes at most one index chunk");
    it.q.resize(qn);
    std::memcpy(it.q.data(), r.q().data(), qn * 4);
    it.k.resize(kn);
    it.v.resize(kn);
    LoadFloats(s.dtype, reinterpret_cast<const uint8_t*>(r.k().data()), it.k.data(), kn);
    LoadFloats(s.dtype, reinterpret_cast<const uint8_t*>(r.v().data()), it.v.data(), kn);
    it.hidden.resize(r.hidden().size() / 4);
    if (!it.hidden.empty()) std::memcpy(it.hidden.data(), r.hidden().data(), r.hidden().size());
    it.out.assign(qn, 0.0f);
    it.lse.assign(size_t{n} * s.q_heads, 0.0f);
    it.count = n;
    return absl::OkStatus();
  }

  // Runs the batch into results_; returns the bytes of the requests refused for the caller's
  // own fault (RefusedByClientFault), which the throttle charges.
  uint64_t Run() {
    uint64_t refused = 0;
    const auto& reqs = batch_.requests();
    items_.assign(reqs.size(), Item{});
    steps_.clear();
    for (int i = 0; i < reqs.size(); ++i) {
      Item& it = items_[i];
      it.status = Prepare(reqs[i], it);
      if (!it.status.ok()) continue;
      it.first = static_cast<uint32_t>(steps_.size());
      const ModelSpec& s = it.spec;
      const size_t qs = size_t{s.q_heads} * s.head_dim, ks = size_t{s.kv_heads} * s.head_dim;
      for (uint32_t j = 0; j < it.count; ++j) {
        LayerStep ls;
        ls.session = ScopedSessionId(who_, reqs[i].session_id());
        ls.step = reqs[i].step();
        ls.layer = reqs[i].layer() + j;
        ls.q = absl::MakeConstSpan(it.q.data() + j * qs, qs);
        ls.k = absl::MakeConstSpan(it.k.data() + j * ks, ks);
        ls.v = absl::MakeConstSpan(it.v.data() + j * ks, ks);
        if (j == 0) {
          ls.hidden = it.hidden;
          if (reqs[i].has_index_keys())
            ls.index_keys = absl::MakeConstSpan(
                reinterpret_cast<const uint8_t*>(reqs[i].index_keys().data().data()),
                reqs[i].index_keys().data().size());
        }
        ls.out = it.out.data() + j * qs;
        ls.lse = it.lse.data() + size_t{j} * s.q_heads;
        ls.stalled = &it.stalled;
        steps_.push_back(std::move(ls));
      }
    }
    // A whole-step request must not run its later layers after an earlier one failed:
    // run request by request so each sees its own layers in order.
    results_.Clear();
    for (int i = 0; i < reqs.size(); ++i) {
      Item& it = items_[i];
      if (it.status.ok()) {
        for (uint32_t j = 0; j < it.count && it.status.ok(); ++j)
          it.status = core_->Step(absl::MakeConstSpan(&steps_[it.first + j], 1))[0];
      }
      v1::LayerResult* res = results_.add_results();
      res->set_session_id(reqs[i].session_id());
      res->set_step(reqs[i].step());
      res->set_layer(reqs[i].layer());
      res->set_layer_count(std::max<uint32_t>(1, reqs[i].layer_count()));
      if (!it.status.ok()) {
        if (RefusedByClientFault(it.status)) refused += reqs[i].ByteSizeLong();
        res->set_code(static_cast<int32_t>(it.status.code()));
        res->set_message(std::string(it.status.message()));
        if (absl::IsNotFound(it.status)) specs_.erase(ScopedSessionId(who_, reqs[i].session_id()));
        continue;
      }
      res->set_out(it.out.data(), it.out.size() * 4);
      res->set_lse(it.lse.data(), it.lse.size() * 4);
      res->set_stalled(it.stalled);
    }
    return refused;
  }

  DecodeCore* core_;
  RefusalThrottle* throttle_;
  Identity who_;
  v1::DecodeBatch batch_;
  v1::DecodeResults results_;
  std::vector<Item> items_;
  std::vector<LayerStep> steps_;
  std::map<std::string, ModelSpec> specs_;
};

}  // namespace

void DecodeService::AddMetrics(MetricsRegistry* metrics) const {
  metrics->AddCollector([this](std::string* out) {
    AppendMetricFamily(out, "fm_decode_refused_bytes_total",
                       "Bytes of DecodeStream requests refused for the client's fault.", "counter",
                       {{"", double(throttle_.refused())}});
    AppendMetricFamily(out, "fm_decode_throttled_answers_total",
                       "DecodeStream answers held back by the refusal throttle.", "counter",
                       {{"", double(throttle_.delayed())}});
  });
}

grpc::ServerUnaryReactor* DecodeService::OpenSession(grpc::CallbackServerContext* ctx,
                                                     const v1::OpenSessionRequest* req,
                                                     v1::OpenSessionResponse* resp) {
  auto who = Caller(*ctx);
  if (!who.ok()) return FinishUnary(ctx, who.status());
  const std::string id = ScopedSessionId(*who, req->session_id());
  absl::StatusOr<SessionOptions> opts = SessionOptionsFromProto(*req);
  if (!opts.ok()) return FinishUnary(ctx, opts.status());
  const SessionOptions& o = *opts;
  absl::Status st = core_->Open(id, o);
  if (st.ok()) {
    auto stats = core_->Stats(id);
    if (stats.ok()) {
      resp->set_reserve_pages(stats->reserved_cells);
      if (o.resume) {
        resp->set_tokens(stats->tokens);
        resp->set_next_step(stats->next_step);
      }
    }
  }
  return FinishUnary(ctx, st);
}

grpc::ServerReadReactor<v1::PrefillChunk>* DecodeService::Prefill(grpc::CallbackServerContext* ctx,
                                                                  v1::PrefillResponse* resp) {
  return new PrefillReader(core_, resp, Caller(*ctx));
}

grpc::ServerBidiReactor<v1::DecodeBatch, v1::DecodeResults>* DecodeService::DecodeStream(
    grpc::CallbackServerContext* ctx) {
  return new StepStream(core_, &throttle_, Caller(*ctx));
}

grpc::ServerUnaryReactor* DecodeService::CloseSession(grpc::CallbackServerContext* ctx,
                                                      const v1::CloseSessionRequest* req,
                                                      v1::CloseSessionResponse*) {
  auto who = Caller(*ctx);
  if (!who.ok()) return FinishUnary(ctx, who.status());
  return FinishUnary(ctx,
                     core_->Close(ScopedSessionId(*who, req->session_id()), req->delete_pages()));
}

grpc::ServerUnaryReactor* DecodeService::GetSessionStats(grpc::CallbackServerContext* ctx,
                                                         const v1::SessionStatsRequest* req,
                                                         v1::SessionStatsResponse* resp) {
  auto who = Caller(*ctx);
  if (!who.ok()) return FinishUnary(ctx, who.status());
  const std::string id = ScopedSessionId(*who, req->session_id());
  auto st = core_->Stats(id);
  if (!st.ok()) return FinishUnary(ctx, st.status());
  auto spec = core_->SessionSpec(id);
  const uint64_t pb = spec.ok() ? spec->PageBytes() : 0;
  resp->set_tokens(st->tokens);
  resp->set_steps(st->steps);
  resp->set_resident_pages(st->resident_pages);
  resp->set_peak_resident_bytes(st->peak_resident_pages * pb);
  resp->set_full_kv_bytes(st->total_pages * pb);
  resp->set_footprint(st->footprint);
  resp->set_stalls(st->stalls);
  resp->set_stall_ms(st->stall_ms);
  resp->set_catch_up_stalls(st->catch_up_stalls);
  resp->set_pages_fetched(st->fetched_pages);
  resp->set_surprise_fetches(st->surprise_fetches);
  resp->set_miss_checks(st->miss_checks);
  resp->set_miss_fires(st->miss_fires);
  resp->set_miss_evictions(st->miss_evictions);
  resp->set_miss_exact_pages(st->miss_exact_pages);
  resp->set_reregistrations(st->reregistrations);
  resp->set_fetching(st->fetching);
  resp->set_tau(st->tau);
  resp->set_switch_lag(st->switch_lag);
  resp->set_predictions(st->predictions);
  resp->set_prediction_failures(st->prediction_failures);
  resp->set_pages_deferred(st->deferred_pages);
  resp->set_warmup_waits(st->warmup_waits);
  resp->set_reserve_pages(st->reserved_cells);
  resp->set_total_pages(st->total_pages);
  if (req->probe_pages_size() > 0) {
    auto r = core_->Resident(id, {req->probe_pages().begin(), req->probe_pages().end()});
    if (!r.ok()) return FinishUnary(ctx, r.status());
    for (bool b : *r) resp->add_probe_resident(b);
  }
  return FinishUnary(ctx, absl::OkStatus());
}

}  // namespace fm::decode
