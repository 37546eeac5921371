// The saved decode state: written after every seal and at close, read by a resume.
#include "services/decode/decode_core_impl.h"
#include "services/decode/session_proto.h"

namespace fm::decode {

flashmemory::v1::DecodeSessionState UpgradeState(const flashmemory::v1::DecodeSessionState& old) {
  namespace v1 = flashmemory::v1;
  if (old.layout() != 0) return old;
  v1::DecodeSessionState st;
  st.set_layout(kStateLayout);
  v1::OpenSessionRequest& o = *st.mutable_options();
  *o.mutable_spec() = old.spec();
  o.set_mode(old.mode());
  o.set_policy(old.policy());
  o.set_budget(old.budget());
  o.set_max_pages(old.max_pages());
  o.set_tau(old.tau());
  o.set_switch_lag(old.switch_lag());
  o.set_level2_topk(old.level2_topk());
  o.set_miss_ratio(old.miss_ratio());
  o.set_max_tokens(old.max_tokens());
  v1::SavedPosition& pos = *st.mutable_position();
  pos.set_tokens(old.tokens());
  pos.set_next_step(old.next_step());
  pos.set_decoding(old.decoding());
  pos.set_key_chunks(old.key_chunks());
  pos.set_sent_chunks(old.sent_chunks());
  pos.set_sent_pages(old.sent_pages());
  pos.set_pending_keys(old.pending_keys());
  pos.set_have_set(old.have_set());
  *pos.mutable_wanted() = old.wanted();
  *pos.mutable_ranked() = old.ranked();
  pos.set_launched_for(old.launched_for());
  if (old.job()) {
    v1::SavedJob& j = *st.mutable_saved_job();
    j.set_step(old.job_step());
    j.set_switch_step(old.switch_step());
    j.set_cells(old.job_cells());
    j.set_catch_up(old.job_catch_up());
    *j.mutable_pages() = old.job_pages();
    j.set_sealed(old.job_sealed());
    *j.mutable_resident() = old.job_resident();
    j.set_has_hidden(old.job_has_hidden());
    j.set_hidden(old.job_hidden());
    j.set_query(old.job_query());
    j.set_done(old.job_done());
    *j.mutable_wanted() = old.job_wanted();
    *j.mutable_ranked() = old.job_ranked();
    *j.mutable_fetched() = old.job_fetched();
    *j.mutable_deferred_pages() = old.job_deferred_pages();
  }
  if (old.recovery()) {
    v1::SavedRecovery& r = *st.mutable_saved_recovery();
    r.set_install_step(old.recovery_install_step());
    r.set_cells(old.recovery_cells());
    r.set_q(old.recovery_q());
    r.set_lse(old.recovery_lse());
    *r.mutable_pages() = old.recovery_pages();
    r.set_done(old.recovery_done());
    *r.mutable_fetched() = old.recovery_fetched();
  }
  v1::SavedStats& ss = *st.mutable_stats();
  ss.set_steps(old.steps());
  ss.set_stalls(old.stalls());
  ss.set_stall_ms(old.stall_ms());
  ss.set_catch_up_stalls(old.catch_up_stalls());
  ss.set_predictions(old.predictions());
  ss.set_surprise_fetches(old.surprise_fetches());
  ss.set_miss_checks(old.miss_checks());
  ss.set_miss_fires(old.miss_fires());
  return st;
}

absl::Status DecodeCore::Impl::SaveState(Session& s, bool to_indexer) {
  if (s.trace) return absl::OkStatus();  // a trace lives in its worker: nothing to resume
  const ModelSpec& sp = s.opt.spec;
  // The history the state says the indexer was given: what it was sent (a flush first), or
  // at a close, every page whose keys records are in the kvstore (a resume re-registers the
  // session from them), the keys after them kept in the state.
  if (s.opt.mode == Mode::kSparse) {
    absl::Status st = to_indexer ? Flush(s) : PersistKeys(s);
    if (!st.ok()) return st;
  }
  const uint64_t sent_pages = to_indexer ? s.sent_pages : std::max(s.sent_pages, s.persisted_pages);
  const uint64_t skip = (sent_pages - s.sent_pages) * sp.ChunksPerPage();
  namespace v1 = flashmemory::v1;
  v1::DecodeSessionState st;
  st.set_layout(kStateLayout);
  // The options as resolved, without the evaluation-only oracle masses (written at every
  // seal: no copy of them).
  SessionOptionsToProto(s.opt, st.mutable_options(), /*with_oracle=*/false);
  st.mutable_options()->set_tau(s.tau);
  st.mutable_options()->set_switch_lag(s.lag);
  st.mutable_options()->set_resume(false);
  v1::SavedPosition& pos = *st.mutable_position();
  pos.set_tokens(s.tokens);
  pos.set_next_step(s.next_step);
  pos.set_decoding(s.decoding);
  pos.set_key_chunks(s.key_chunks);
  pos.set_sent_chunks(s.sent_chunks + skip);
  pos.set_sent_pages(sent_pages);
  for (const auto& k : s.keys)
    pos.mutable_pending_keys()->append(k.begin() + skip * sp.IndexKeyBytes(), k.end());
  pos.set_have_set(s.have_set);
  for (uint64_t p : s.wanted) pos.add_wanted(p);
  for (uint64_t p : s.ranked) pos.add_ranked(p);
  pos.set_launched_for(s.launched_for);
  if (s.job) {
    const Job& j = *s.job;
    v1::SavedJob& sj = *st.mutable_saved_job();
    sj.set_step(j.step);
    sj.set_switch_step(s.switch_step);
    sj.set_done(j.done && j.status.ok());
    if (sj.done()) {
      for (uint64_t p : j.wanted) sj.add_wanted(p);
      for (uint64_t p : j.ranked) sj.add_ranked(p);
      for (const auto& [p, c] : j.fetched) sj.add_fetched(p);
      for (uint64_t p : j.deferred_pages) sj.add_deferred_pages(p);
    }
    sj.set_has_hidden(!j.args.hidden.empty());
    sj.set_hidden(j.args.hidden.data(), j.args.hidden.size() * 4);
    sj.set_query(j.args.query.data(), j.args.query.size() * 4);
    sj.set_cells(j.cells.size());
    sj.set_catch_up(j.catch_up);
    for (uint64_t p : j.pages) sj.add_pages(p);
    sj.set_sealed(j.args.history_pages);
    for (uint64_t p : j.resident) sj.add_resident(p);
  }
  if (s.recovery) {
    const Session::Recovery& r = *s.recovery;
    v1::SavedRecovery& sr = *st.mutable_saved_recovery();
    sr.set_install_step(r.install_step);
    sr.set_done(r.done && !r.cancelled);
    if (sr.done())
      for (const auto& [p, c] : r.fetched) sr.add_fetched(p);
    sr.set_cells(r.cells.size());
    sr.set_q(r.q.data(), r.q.size() * 4);
    sr.set_lse(r.lse.data(), r.lse.size() * 4);
    for (uint64_t p : r.pages) sr.add_pages(p);
  }
  v1::SavedStats& ss = *st.mutable_stats();
  ss.set_steps(s.stats.steps);
  ss.set_stalls(s.stats.stalls);
  ss.set_stall_ms(s.stats.stall_ms);
  ss.set_catch_up_stalls(s.stats.catch_up_stalls);
  ss.set_predictions(s.stats.predictions);
  ss.set_surprise_fetches(s.stats.surprise_fetches);
  ss.set_miss_checks(s.stats.miss_checks);
  ss.set_miss_fires(s.stats.miss_fires);
  const std::string blob = st.SerializeAsString();
  const PageHeaderData h =
      MakePageHeader(s.id, kStatePage, ModelSpecHash(sp), 1, sp.dtype, blob.data(), blob.size());
  return Write(s, h, reinterpret_cast<const uint8_t*>(blob.data()));
}

absl::Status DecodeCore::Impl::RestoreState(const std::shared_ptr<Session>& sp,
                                            const flashmemory::v1::DecodeSessionState& st) {
  Session& s = *sp;
  const flashmemory::v1::SavedPosition& pos = st.position();
  const flashmemory::v1::SavedJob& sj = st.saved_job();
  const flashmemory::v1::SavedRecovery& sr = st.saved_recovery();
  const ModelSpec& spec = s.opt.spec;
  const uint32_t P = spec.page_tokens;
  const size_t kb = spec.IndexKeyBytes();
  s.tokens = pos.tokens();
  s.next_step = pos.next_step();
  s.decoding = pos.decoding();
  s.key_chunks = pos.key_chunks();
  s.sent_chunks = pos.sent_chunks();
  s.sent_pages = s.bound_pages = pos.sent_pages();
  s.registered = s.opt.mode == Mode::kSparse;
  const uint64_t pending = s.key_chunks - s.sent_chunks;
  if (pos.pending_keys().size() != size_t{spec.index_layers} * pending * kb)
    return absl::DataLossError("saved state: pending keys do not match their count");
  for (uint32_t l = 0; l < spec.index_layers; ++l)
    s.keys[l].assign(pos.pending_keys().begin() + l * pending * kb,
                     pos.pending_keys().begin() + (l + 1) * pending * kb);
  s.partial_prefill = s.tokens % P != 0;
  s.stats.steps = st.stats().steps();
  s.stats.stalls = st.stats().stalls();
  s.stats.stall_ms = st.stats().stall_ms();
  s.stats.catch_up_stalls = st.stats().catch_up_stalls();
  s.stats.predictions = st.stats().predictions();
  s.stats.surprise_fetches = st.stats().surprise_fetches();
  s.stats.miss_checks = st.stats().miss_checks();
  s.stats.miss_fires = st.stats().miss_fires();
  s.stats.tokens = s.tokens;
  // The open cell Open made for page 0 holds the open page.
  const uint64_t open = s.open_page();
  if (open >= s.cell_of.size()) return absl::DataLossError("saved state: tokens beyond max_tokens");
  if (open != 0) std::swap(s.cell_of[0], s.cell_of[open]);
  if (s.tokens % P != 0) {
    auto payload = store->ReadPayload(s.id, open);
    if (!payload.ok()) return payload.status();
    if (payload->size() != spec.PageBytes())
      return absl::DataLossError(
          absl::StrCat("open page ", open, " has ", payload->size(), " bytes"));
    std::memcpy(Payload(static_cast<uint32_t>(s.cell_of[open])), payload->data(), payload->size());
  }
  // The resident pages: everything (dense), or sink, tail, the serving set and a finished
  // job's pages (sparse).
  const uint64_t sealed = s.sealed();
  if (Checks(s)) {
    // The miss check's bounds of every sealed page, from the pages themselves.
    constexpr uint64_t kBatch = 32;
    const size_t rec = kPageHeaderBytes + spec.PageBytes();
    std::vector<uint8_t> buf(kBatch * rec);
    std::vector<float> b(indexer::IndexerBoundsFloats(spec));
    for (uint64_t p0 = 0; p0 < sealed; p0 += kBatch) {
      std::vector<uint64_t> pages;
      std::vector<uint8_t*> dst;
      for (uint64_t p = p0; p < std::min(sealed, p0 + kBatch); ++p) {
        pages.push_back(p);
        dst.push_back(buf.data() + (p - p0) * rec);
      }
      if (absl::Status r = store->Read(s.id, pages, spec.PageBytes(), dst); !r.ok()) return r;
      for (size_t i = 0; i < pages.size(); ++i) {
        PageBounds(s, dst[i] + kPageHeaderBytes, P, b.data());
        KeepCheckBounds(s, b.data());
      }
    }
  }
  s.have_set = pos.have_set();
  s.wanted.assign(pos.wanted().begin(), pos.wanted().end());
  s.ranked.assign(pos.ranked().begin(), pos.ranked().end());
  std::vector<uint64_t> load;
  for (uint64_t p = 0; p < sealed; ++p)
    if (s.opt.mode == Mode::kDense || Pinned(s, p) || Wanted(s, p)) load.push_back(p);
  std::vector<uint64_t> job_pages(sj.fetched().begin(), sj.fetched().end());
  std::vector<uint64_t> rec_pages(sr.fetched().begin(), sr.fetched().end());
  for (const auto* v : {&job_pages, &rec_pages})
    for (uint64_t p : *v)
      if (p < sealed && std::find(load.begin(), load.end(), p) == load.end()) load.push_back(p);
  std::vector<uint8_t*> dst;
  for (uint64_t p : load) {
    auto c = TakeCell(s);
    if (!c.ok()) return c.status();
    s.cell_of[p] = *c;
    dst.push_back(Cell(*c));
  }
  if (!load.empty())
    if (absl::Status r = store->Read(s.id, load, spec.PageBytes(), dst); !r.ok()) return r;
  s.plan_dirty = true;
  s.launched_for = pos.launched_for();
  // Pages a job or a miss check fetched move from the cells just read to them, and each
  // takes the cells it held, so that the session goes on exactly as it would have.
  auto take_back = [&](const std::vector<uint64_t>& pages, uint64_t cells,
                       std::vector<std::pair<uint64_t, uint32_t>>* fetched,
                       std::vector<uint32_t>* held) -> absl::Status {
    for (uint64_t p : pages)
      if (p < sealed && !Pinned(s, p) && !Wanted(s, p) && s.cell_of[p] != kNoCell) {
        fetched->push_back({p, static_cast<uint32_t>(s.cell_of[p])});
        held->push_back(static_cast<uint32_t>(s.cell_of[p]));
        s.cell_of[p] = kNoCell;
      }
    while (held->size() < cells) {
      auto c = TakeCell(s);
      if (!c.ok()) return c.status();
      held->push_back(*c);
    }
    return absl::OkStatus();
  };
  if (st.has_saved_recovery()) {
    auto rec = std::make_shared<Session::Recovery>();
    rec->install_step = sr.install_step();
    rec->q.resize(sr.q().size() / 4);
    if (!rec->q.empty())  // (no memcpy of null)
      std::memcpy(rec->q.data(), sr.q().data(), rec->q.size() * 4);
    rec->lse.resize(sr.lse().size() / 4);
    if (!rec->lse.empty())  // (no memcpy of null)
      std::memcpy(rec->lse.data(), sr.lse().data(), rec->lse.size() * 4);
    rec->pages.assign(sr.pages().begin(), sr.pages().end());
    if (sr.done()) {
      rec->done = true;
      if (absl::Status r = take_back(rec_pages, sr.cells(), &rec->fetched, &rec->cells); !r.ok())
        return r;
      s.recovery = rec;
    } else {
      PostCheck(sp, rec, sr.cells());
    }
  }
  if (st.has_saved_job()) {
    s.switch_step = sj.switch_step();
    if (sj.done()) {
      auto job = std::make_shared<Job>();
      job->step = sj.step();
      job->done = true;
      job->wanted.assign(sj.wanted().begin(), sj.wanted().end());
      job->ranked.assign(sj.ranked().begin(), sj.ranked().end());
      if (absl::Status r = take_back(job_pages, sj.cells(), &job->fetched, &job->cells); !r.ok())
        return r;
      job->catch_up = sj.catch_up();
      job->pages.assign(sj.pages().begin(), sj.pages().end());
      job->deferred_pages.assign(sj.deferred_pages().begin(), sj.deferred_pages().end());
      s.job = job;
    } else {
      indexer::PredictArgs a;
      a.step = sj.step();
      if (sj.has_hidden()) {
        a.hidden.resize(sj.hidden().size() / 4);
        if (!a.hidden.empty())  // (no memcpy of null)
          std::memcpy(a.hidden.data(), sj.hidden().data(), a.hidden.size() * 4);
      }
      a.query.resize(sj.query().size() / 4);
      if (!a.query.empty())  // (no memcpy of null)
        std::memcpy(a.query.data(), sj.query().data(), a.query.size() * 4);
      a.budget = s.predict_budget;
      a.policy = s.opt.policy;
      a.sink = options.sink;
      a.tail = options.tail;
      a.history_pages = sj.sealed();
      const std::vector<uint64_t> pages(sj.pages().begin(), sj.pages().end());
      Post(
          sp,
          NewJob(a, sj.catch_up() ? &pages : nullptr, {sj.resident().begin(), sj.resident().end()}),
          sj.cells());
    }
  }
  return absl::OkStatus();
}

}  // namespace fm::decode
