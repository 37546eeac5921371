// One layer of one decode step (DecodeCore::Step).
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

absl::Status DecodeCore::Impl::StepOne(const std::shared_ptr<Session>& sp, const LayerStep& r) {
  Session& s = *sp;
  StepPosition at;
  if (absl::Status st = ValidateStep(s, r, &at); !st.ok()) return st;
  // From here on the request is valid.
  if (r.layer == 0)
    if (absl::Status st = SwitchIfDue(sp, r); !st.ok()) return st;
  if (absl::Status st = AppendToken(s, r, &at); !st.ok()) return st;
  LaunchIfDue(sp, r, at);
  if (absl::Status st = AttendLayer(sp, r, at); !st.ok()) return st;
  if (!at.last) return absl::OkStatus();
  return FinishStep(s, r, at);
}

absl::Status DecodeCore::Impl::ValidateStep(const Session& s, const LayerStep& r,
                                            StepPosition* at) const {
  const ModelSpec& spec = s.opt.spec;
  const uint32_t d = spec.head_dim;
  if (s.closed) return absl::NotFoundError(absl::StrCat("session \"", s.id, "\" is closed"));
  // Protocol position: layer 0 of the current step (re)starts it.
  if (r.step != s.next_step || (r.layer != 0 && r.layer != s.next_layer))
    return absl::FailedPreconditionError(
        absl::StrCat("session \"", s.id, "\" expects step ", s.next_step, " layer ",
                     r.layer == 0 ? 0 : s.next_layer,
                     " (or layer 0 to restart the step); got step ", r.step, " layer ", r.layer));
  if (r.layer >= spec.layers)
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", r.layer, " out of range: the spec has ", spec.layers));
  if (r.q.size() != size_t{spec.q_heads} * d || r.k.size() != size_t{spec.kv_heads} * d ||
      r.v.size() != size_t{spec.kv_heads} * d)
    return absl::InvalidArgumentError(absl::StrCat("step tensors have q ", r.q.size(), ", k ",
                                                   r.k.size(), ", v ", r.v.size(),
                                                   " floats; expected q [", spec.q_heads, "][", d,
                                                   "], k and v [", spec.kv_heads, "][", d, "]"));
  if (!r.hidden.empty() && r.hidden.size() != spec.hidden_dim)
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden has ", r.hidden.size(), " floats; expected hidden_dim = ", spec.hidden_dim));
  const size_t step_key_bytes = size_t{spec.index_layers} * spec.IndexKeyBytes();
  if (!r.index_keys.empty() && r.index_keys.size() != step_key_bytes)
    return absl::InvalidArgumentError(absl::StrCat("index keys have ", r.index_keys.size(),
                                                   " bytes; expected [", spec.index_layers, "][",
                                                   spec.IndexKeyBytes(), "] = ", step_key_bytes));
  if (!AllFinite(r.q) || !AllFinite(r.k) || !AllFinite(r.v) || !AllFinite(r.hidden))
    return absl::InvalidArgumentError("step tensors hold a NaN or infinity");
  if (!r.out) return absl::InvalidArgumentError("no output buffer");
  if (s.tokens + 1 > s.opt.max_tokens)
    return absl::ResourceExhaustedError(
        absl::StrCat("session \"", s.id, "\" is at max_tokens ", s.opt.max_tokens));
  at->last = r.layer + 1 == spec.layers;
  at->completes_chunk = (s.tokens + 1) % spec.chunk_tokens == 0;
  if (at->last && at->completes_chunk && r.index_keys.empty() && !(r.layer > 0 && s.have_step_keys))
    return absl::InvalidArgumentError(
        absl::StrCat("step ", r.step, " completes index chunk ", s.tokens / spec.chunk_tokens,
                     "; one of its layer requests must carry the chunk's index keys"));
  at->seals = at->last && (s.tokens + 1) % spec.page_tokens == 0;
  return absl::OkStatus();
}

absl::Status DecodeCore::Impl::SwitchIfDue(const std::shared_ptr<Session>& sp, const LayerStep& r) {
  Session& s = *sp;
  s.have_hidden = false;
  s.have_step_keys = false;
  if (!s.decoding && s.opt.mode == Mode::kSparse)
    if (absl::Status st = Flush(s); !st.ok()) return st;
  s.decoding = true;
  if (s.opt.mode == Mode::kSparse && s.job && (r.step >= s.switch_step || !s.have_set)) {
    if (!s.job->done) {
      const bool stall = s.have_set;  // else the warm-up
      const auto t0 = std::chrono::steady_clock::now();
      while (!s.job->done) s.job_cv.Wait(&s.mu);
      if (stall) {
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
        ++s.stats.stalls;
        ++totals.stalls;
        if (s.job->catch_up) {
          ++s.stats.catch_up_stalls;
          ++totals.catch_up_stalls;
        }
        s.stats.stall_ms += ms;
        totals.stall_us += static_cast<uint64_t>(ms * 1000);
        if (r.stalled) *r.stalled = true;
      } else {
        ++s.stats.warmup_waits;
      }
    }
    Install(sp, r.step);
  }
  if (s.recovery && r.step >= s.recovery->install_step) {
    while (!s.recovery->done) s.job_cv.Wait(&s.mu);
    InstallRecovery(s);
  }
  return absl::OkStatus();
}
absl::Status DecodeCore::Impl::AppendToken(Session& s, const LayerStep& r, StepPosition* at) {
  const ModelSpec& spec = s.opt.spec;
  const uint32_t d = spec.head_dim;
  if (!r.hidden.empty()) {
    std::copy(r.hidden.begin(), r.hidden.end(), s.hidden.begin());
    s.have_hidden = true;
  }
  if (!r.index_keys.empty()) {
    s.step_keys.assign(r.index_keys.begin(), r.index_keys.end());
    s.have_step_keys = true;
  }
  for (uint32_t l = 0; l < spec.index_layers; ++l)
    if (indexer::ModelLayerOfIndexLayer(spec, l) == r.layer)
      std::copy(r.q.begin(), r.q.end(), s.index_query.begin() + size_t{l} * spec.q_heads * d);

  // The new token's K and V go into the open page.
  at->open = s.open_page();
  at->page = Payload(static_cast<uint32_t>(s.cell_of[at->open]));
  at->row = static_cast<uint32_t>(s.tokens % spec.page_tokens);
  const size_t es = DTypeSize(spec.dtype);
  for (uint32_t h = 0; h < spec.kv_heads; ++h) {
    StoreFloats(spec.dtype, r.k.data() + size_t{h} * d,
                at->page + spec.ElemOffset(r.layer, 0, h, at->row) * es, d);
    StoreFloats(spec.dtype, r.v.data() + size_t{h} * d,
                at->page + spec.ElemOffset(r.layer, 1, h, at->row) * es, d);
  }
  // The page is complete once this layer's row is in: store it before anything changes, so
  // a store failure leaves the step retryable.
  if (at->seals) return PutPage(s, at->open, at->page, spec.page_tokens);
  return absl::OkStatus();
}

void DecodeCore::Impl::LaunchIfDue(const std::shared_ptr<Session>& sp, const LayerStep& r,
                                   const StepPosition& at) {
  Session& s = *sp;
  const ModelSpec& spec = s.opt.spec;
  // The prediction of a cycle starts once its input is in.
  bool ready;  // lsa reads the hidden state, quest and model_query the index layers' queries
  switch (s.opt.policy) {
    case indexer::Policy::kDefault:
    case indexer::Policy::kLsa:
      ready = s.have_hidden || at.last;
      break;
    case indexer::Policy::kQuest:
    case indexer::Policy::kModelQuery:
      ready = r.layer >= indexer::ModelLayerOfIndexLayer(spec, spec.index_layers - 1);
      break;
    default:
      ready = true;
  }
  if (s.opt.mode != Mode::kSparse || r.step % s.tau != 0 || s.launched_for == r.step || s.job ||
      !ready)
    return;
  Launch(sp);
  if (!s.have_set) {  // the session's first prediction: wait for it (warm-up)
    ++s.stats.warmup_waits;
    while (!s.job->done) s.job_cv.Wait(&s.mu);
    Install(sp, r.step);
  }
}

absl::Status DecodeCore::Impl::AttendLayer(const std::shared_ptr<Session>& sp, const LayerStep& r,
                                           const StepPosition& at) {
  Session& s = *sp;
  const ModelSpec& spec = s.opt.spec;
  const bool check = options.miss_check && s.opt.mode == Mode::kSparse && s.have_set &&
                     !s.recovery && s.opt.miss_ratio <= 0 &&
                     r.layer == indexer::ModelLayerOfIndexLayer(spec, spec.index_layers - 1);
  // The session's own miss check (SessionOptions::miss_ratio) runs on every index layer.
  int sync_layer = -1;
  if (s.opt.miss_ratio > 0 && s.opt.mode == Mode::kSparse && s.have_set)
    for (uint32_t l = 0; l < spec.index_layers; ++l)
      if (indexer::ModelLayerOfIndexLayer(spec, l) == r.layer) sync_layer = static_cast<int>(l);
  const bool need_lse = check || sync_layer >= 0 || s.trace;
  std::vector<float> lse_buf(need_lse && !r.lse ? spec.q_heads : 0);
  float* lse = r.lse ? r.lse : (need_lse ? lse_buf.data() : nullptr);
  auto attend = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) -> absl::Status {
    if (s.plan_dirty)
      if (absl::Status st = RebuildPlan(s); !st.ok()) return st;
    s.list_valid.back() = static_cast<uint16_t>(at.row + 1);
    kernels::DecodeItem item{0, r.layer, r.q.data(), r.out, lse};
    kernels::KernelStatus ks;
    s.WithoutLock([&] {
      ks = s.opt.level2_topk == 0
               ? kernels::RunPagedDecode(s.plan, Pool(), &item, 1)
               : kernels::TopKDecode(s.shape, Pool(),
                                     kernels::PageList{s.list_cells.data(), s.list_valid.data(),
                                                       static_cast<uint32_t>(s.list_cells.size())},
                                     r.layer, s.opt.level2_topk, r.q.data(), r.out, lse);
    });
    // (A Close waits for the running step, so this holds only for a session that never
    // opened.)
    if (s.closed) return absl::NotFoundError(absl::StrCat("session \"", s.id, "\" was closed"));
    if (ks != kernels::KernelStatus::kOk)
      return absl::InternalError(absl::StrCat("attention: ", kernels::KernelStatusName(ks)));
    return absl::OkStatus();
  };
  if (absl::Status st = attend(); !st.ok()) return st;
  if (sync_layer >= 0) {
    bool fetched = false;
    if (absl::Status st =
            RecoverMisses(s, static_cast<uint32_t>(sync_layer), r.q.data(), lse, &fetched);
        !st.ok())
      return st;
    if (fetched) {
      if (r.stalled) *r.stalled = true;
      if (absl::Status st = attend(); !st.ok()) return st;
    }
  }
  s.next_layer = r.layer + 1;
  if (check) LaunchCheck(sp, r.q.data(), lse);
  if (s.trace) {  // the history's pages in order: a trace session holds them all
    if (r.layer == 0) s.trace->StartDecoding(s.tokens);
    if (!r.hidden.empty()) s.trace->SetHidden(static_cast<uint32_t>(r.step), r.hidden);
    std::vector<const uint8_t*> pages;
    for (uint32_t c : s.list_cells) pages.push_back(Payload(c));
    s.trace->AddLayer(static_cast<uint32_t>(r.step), r.layer, r.q.data(), lse, pages, at.row + 1);
  }
  return absl::OkStatus();
}

absl::Status DecodeCore::Impl::FinishStep(Session& s, const LayerStep& r, const StepPosition& at) {
  const ModelSpec& spec = s.opt.spec;
  if (at.completes_chunk && s.opt.mode == Mode::kSparse) {
    const size_t kb = spec.IndexKeyBytes();
    for (uint32_t l = 0; l < spec.index_layers; ++l)
      s.keys[l].insert(s.keys[l].end(), s.step_keys.begin() + l * kb,
                       s.step_keys.begin() + (l + 1) * kb);
    KeepCheckKeys(s, s.step_keys.data(), 1, kb);
  }
  if (at.completes_chunk) ++s.key_chunks;
  if (s.trace) {
    if (at.completes_chunk) s.trace->AddKeys(s.step_keys.data(), 1);
    s.trace->EndStep(static_cast<uint32_t>(r.step));
  }
  ++s.tokens;
  ++s.next_step;
  s.next_layer = 0;
  ++s.stats.steps;
  ++totals.steps;
  s.stats.tokens = s.tokens;
  if (!at.seals) return absl::OkStatus();
  if (s.opt.mode == Mode::kSparse) {
    const size_t bf = indexer::IndexerBoundsFloats(spec);
    s.bounds.resize(s.bounds.size() + bf);
    PageBounds(s, at.page, spec.page_tokens, s.bounds.data() + s.bounds.size() - bf);
    KeepCheckBounds(s, s.bounds.data() + s.bounds.size() - bf);
    s.bound_pages = at.open + 1;
  }
  s.plan_dirty = true;
  Trim(s);
  if (absl::Status st = EnsureOpenCell(s); !st.ok()) return st;
  // The state a resuming worker starts from; a store or indexer that is down only delays it
  // to the next seal.
  (void)SaveState(s);
  return absl::OkStatus();
}

std::vector<absl::Status> DecodeCore::Step(absl::Span<const LayerStep> batch) {
  std::vector<absl::Status> out;
  out.reserve(batch.size());
  for (const LayerStep& r : batch) {
    auto s = impl_->Find(r.session);
    if (!s) {
      out.push_back(absl::NotFoundError(absl::StrCat("unknown session \"", r.session, "\"")));
      continue;
    }
    absl::MutexLock l(&s->mu);
    if (absl::Status st = s->Enter(); !st.ok()) {
      out.push_back(st);
      continue;
    }
    out.push_back(impl_->StepOne(s, r));
    s->Leave();
  }
  return out;
}

}  // namespace fm::decode
