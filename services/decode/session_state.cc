// The saved decode state: written after every seal and at close, read by a resume.
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

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
  SpecToProto(sp, st.mutable_spec());
  st.set_mode(s.opt.mode == Mode::kDense ? v1::DECODE_MODE_DENSE : v1::DECODE_MODE_SPARSE);
  st.set_policy(static_cast<v1::Policy>(s.opt.policy));
  st.set_budget(s.opt.budget);
  st.set_max_pages(s.opt.max_pages);
  st.set_tau(s.tau);
  st.set_switch_lag(s.lag);
  st.set_level2_topk(s.opt.level2_topk);
  st.set_miss_ratio(s.opt.miss_ratio);
  st.set_miss_checks(s.stats.miss_checks);
  st.set_miss_fires(s.stats.miss_fires);
  st.set_max_tokens(s.opt.max_tokens);
  st.set_tokens(s.tokens);
  st.set_next_step(s.next_step);
  st.set_decoding(s.decoding);
  st.set_key_chunks(s.key_chunks);
  st.set_sent_chunks(s.sent_chunks + skip);
  st.set_sent_pages(sent_pages);
  for (const auto& k : s.keys)
    st.mutable_pending_keys()->append(k.begin() + skip * sp.IndexKeyBytes(), k.end());
  st.set_have_set(s.have_set);
  for (uint64_t p : s.wanted) st.add_wanted(p);
  for (uint64_t p : s.ranked) st.add_ranked(p);
  if (s.job) {
    const Job& j = *s.job;
    st.set_job(true);
    st.set_job_step(j.step);
    st.set_switch_step(s.switch_step);
    st.set_job_done(j.done && j.status.ok());
    if (j.done && j.status.ok()) {
      for (uint64_t p : j.wanted) st.add_job_wanted(p);
      for (uint64_t p : j.ranked) st.add_job_ranked(p);
      for (const auto& [p, c] : j.fetched) st.add_job_fetched(p);
    }
    st.set_job_has_hidden(!j.args.hidden.empty());
    st.set_job_hidden(j.args.hidden.data(), j.args.hidden.size() * 4);
    st.set_job_query(j.args.query.data(), j.args.query.size() * 4);
    st.set_job_cells(j.cells.size());
    st.set_job_catch_up(j.catch_up);
    for (uint64_t p : j.pages) st.add_job_pages(p);
    st.set_job_sealed(j.args.history_pages);
    for (uint64_t p : j.resident) st.add_job_resident(p);
    if (j.done && j.status.ok())
      for (uint64_t p : j.deferred_pages) st.add_job_deferred_pages(p);
  }
  if (s.recovery) {
    const Session::Recovery& r = *s.recovery;
    st.set_recovery(true);
    st.set_recovery_install_step(r.install_step);
    st.set_recovery_done(r.done && !r.cancelled);
    if (r.done && !r.cancelled)
      for (const auto& [p, c] : r.fetched) st.add_recovery_fetched(p);
    st.set_recovery_cells(r.cells.size());
    st.set_recovery_q(r.q.data(), r.q.size() * 4);
    st.set_recovery_lse(r.lse.data(), r.lse.size() * 4);
    for (uint64_t p : r.pages) st.add_recovery_pages(p);
  }
  st.set_surprise_fetches(s.stats.surprise_fetches);
  st.set_launched_for(s.launched_for);
  st.set_steps(s.stats.steps);
  st.set_stalls(s.stats.stalls);
  st.set_stall_ms(s.stats.stall_ms);
  st.set_catch_up_stalls(s.stats.catch_up_stalls);
  st.set_predictions(s.stats.predictions);
  const std::string blob = st.SerializeAsString();
  const PageHeaderData h =
      MakePageHeader(s.id, kStatePage, ModelSpecHash(sp), 1, sp.dtype, blob.data(), blob.size());
  return Write(s, h, reinterpret_cast<const uint8_t*>(blob.data()));
}

absl::Status DecodeCore::Impl::RestoreState(const std::shared_ptr<Session>& sp,
                                            const flashmemory::v1::DecodeSessionState& st) {
  Session& s = *sp;
  const ModelSpec& spec = s.opt.spec;
  const uint32_t P = spec.page_tokens;
  const size_t kb = spec.IndexKeyBytes();
  s.tokens = st.tokens();
  s.next_step = st.next_step();
  s.decoding = st.decoding();
  s.key_chunks = st.key_chunks();
  s.sent_chunks = st.sent_chunks();
  s.sent_pages = s.bound_pages = st.sent_pages();
  s.registered = s.opt.mode == Mode::kSparse;
  const uint64_t pending = s.key_chunks - s.sent_chunks;
  if (st.pending_keys().size() != size_t{spec.index_layers} * pending * kb)
    return absl::DataLossError("saved state: pending keys do not match their count");
  for (uint32_t l = 0; l < spec.index_layers; ++l)
    s.keys[l].assign(st.pending_keys().begin() + l * pending * kb,
                     st.pending_keys().begin() + (l + 1) * pending * kb);
  s.partial_prefill = s.tokens % P != 0;
  s.stats.steps = st.steps();
  s.stats.stalls = st.stalls();
  s.stats.stall_ms = st.stall_ms();
  s.stats.catch_up_stalls = st.catch_up_stalls();
  s.stats.predictions = st.predictions();
  s.stats.surprise_fetches = st.surprise_fetches();
  s.stats.miss_checks = st.miss_checks();
  s.stats.miss_fires = st.miss_fires();
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
  s.have_set = st.have_set();
  s.wanted.assign(st.wanted().begin(), st.wanted().end());
  s.ranked.assign(st.ranked().begin(), st.ranked().end());
  std::vector<uint64_t> load;
  for (uint64_t p = 0; p < sealed; ++p)
    if (s.opt.mode == Mode::kDense || Pinned(s, p) || Wanted(s, p)) load.push_back(p);
  std::vector<uint64_t> job_pages(st.job_fetched().begin(), st.job_fetched().end());
  std::vector<uint64_t> rec_pages(st.recovery_fetched().begin(), st.recovery_fetched().end());
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
  s.launched_for = st.launched_for();
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
  if (st.recovery()) {
    auto rec = std::make_shared<Session::Recovery>();
    rec->install_step = st.recovery_install_step();
    rec->q.resize(st.recovery_q().size() / 4);
    if (!rec->q.empty())  // (no memcpy of null)
      std::memcpy(rec->q.data(), st.recovery_q().data(), rec->q.size() * 4);
    rec->lse.resize(st.recovery_lse().size() / 4);
    if (!rec->lse.empty())  // (no memcpy of null)
      std::memcpy(rec->lse.data(), st.recovery_lse().data(), rec->lse.size() * 4);
    rec->pages.assign(st.recovery_pages().begin(), st.recovery_pages().end());
    if (st.recovery_done()) {
      rec->done = true;
      if (absl::Status r = take_back(rec_pages, st.recovery_cells(), &rec->fetched, &rec->cells);
          !r.ok())
        return r;
      s.recovery = rec;
    } else {
      PostCheck(sp, rec, st.recovery_cells());
    }
  }
  if (st.job()) {
    s.switch_step = st.switch_step();
    if (st.job_done()) {
      auto job = std::make_shared<Job>();
      job->step = st.job_step();
      job->done = true;
      job->wanted.assign(st.job_wanted().begin(), st.job_wanted().end());
      job->ranked.assign(st.job_ranked().begin(), st.job_ranked().end());
      if (absl::Status r = take_back(job_pages, st.job_cells(), &job->fetched, &job->cells);
          !r.ok())
        return r;
      job->catch_up = st.job_catch_up();
      job->pages.assign(st.job_pages().begin(), st.job_pages().end());
      job->deferred_pages.assign(st.job_deferred_pages().begin(), st.job_deferred_pages().end());
      s.job = job;
    } else {
      indexer::PredictArgs a;
      a.step = st.job_step();
      if (st.job_has_hidden()) {
        a.hidden.resize(st.job_hidden().size() / 4);
        if (!a.hidden.empty())  // (no memcpy of null)
          std::memcpy(a.hidden.data(), st.job_hidden().data(), a.hidden.size() * 4);
      }
      a.query.resize(st.job_query().size() / 4);
      if (!a.query.empty())  // (no memcpy of null)
        std::memcpy(a.query.data(), st.job_query().data(), a.query.size() * 4);
      a.budget = s.predict_budget;
      a.policy = s.opt.policy;
      a.sink = options.sink;
      a.tail = options.tail;
      a.history_pages = st.job_sealed();
      const std::vector<uint64_t> pages(st.job_pages().begin(), st.job_pages().end());
      Post(sp,
           NewJob(a, st.job_catch_up() ? &pages : nullptr,
                  {st.job_resident().begin(), st.job_resident().end()}),
           st.job_cells());
    }
  }
  return absl::OkStatus();
}

}  // namespace fm::decode
