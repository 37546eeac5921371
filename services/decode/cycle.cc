// The cycle: a prediction at each cycle start, its fetch, the switch to its set, and the
// catch-ups of the pages that did not fit.
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

void DecodeCore::Impl::Launch(const std::shared_ptr<Session>& sp) {
  Session& s = *sp;
  indexer::PredictArgs a;
  s.launched_for = s.next_step;
  s.switch_step = s.next_step + s.lag;
  a.step = s.next_step;
  if (s.have_hidden) a.hidden = s.hidden;
  a.query = s.index_query;
  a.budget = s.predict_budget;
  a.policy = s.opt.policy;
  if (!s.opt.oracle_page_mass.empty()) {  // the steps the set will serve
    const uint64_t total = s.opt.spec.PagesForTokens(s.opt.max_tokens);
    const uint64_t rows = s.opt.oracle_page_mass.size() / total;
    a.oracle_page_mass.assign(total, 0.0f);
    for (uint64_t r = s.switch_step; r < std::min(rows, s.switch_step + s.tau); ++r)
      for (uint64_t p = 0; p < total; ++p)
        a.oracle_page_mass[p] += s.opt.oracle_page_mass[r * total + p];
  }
  a.sink = options.sink;
  a.tail = options.tail;
  a.history_pages = s.sealed();  // also the job's
  ++s.stats.predictions;
  ++totals.predictions;
  if (s.have_set) MakeRoom(s);
  // At most a catch-up's worth of pages before the switch (cells a short catch-up left
  // free would otherwise make the fetch longer than the lag); the rest come in catch-ups.
  // The first prediction is waited for: all of it.
  const uint64_t spare = Spare(s, KeepFree(s));
  Post(sp, NewJob(a, nullptr, ResidentPages(s)), s.have_set ? std::min(spare, s.lag_pages) : spare);
}

void DecodeCore::Impl::MakeRoom(Session& s) {
  uint64_t spare = Spare(s, KeepFree(s));
  for (auto it = s.ranked.rbegin(); it != s.ranked.rend() && spare < s.headroom_pages; ++it)
    if (*it < s.sealed() && s.cell_of[*it] != kNoCell && !Pinned(s, *it)) {
      EvictFromSet(s, *it);
      ++spare;
    }
}

std::shared_ptr<Job> DecodeCore::Impl::NewJob(const indexer::PredictArgs& a,
                                              const std::vector<uint64_t>* catch_up,
                                              std::vector<uint64_t> resident) {
  auto job = std::make_shared<Job>();
  job->step = a.step;
  job->args = a;
  if (catch_up) {
    job->catch_up = true;
    job->pages = *catch_up;
  }
  job->resident = std::move(resident);
  return job;
}

void DecodeCore::Impl::Post(const std::shared_ptr<Session>& sp, const std::shared_ptr<Job>& job,
                            uint64_t cells) {
  for (uint64_t i = 0; i < cells; ++i) {
    auto c = TakeCell(*sp);
    if (!c.ok()) break;
    job->cells.push_back(*c);
  }
  sp->job = job;
  jobs.Post([this, sp, job] { RunJob(sp, job, job->args); });
}

void DecodeCore::Impl::ReleaseCells(Session& s, CellFetch& f, bool all) {
  for (size_t i = all ? 0 : f.fetched.size(); i < f.cells.size(); ++i) GiveCell(s, f.cells[i]);
  f.cells.clear();
  if (all) f.fetched.clear();
}

std::vector<uint64_t> DecodeCore::Impl::Place(Session& s, CellFetch& f) {
  ReleaseCells(s, f, false);
  std::vector<uint64_t> placed;
  for (const auto& [p, c] : f.fetched) {
    if (s.cell_of[p] != kNoCell) {
      GiveCell(s, c);
      continue;
    }
    s.cell_of[p] = c;
    placed.push_back(p);
  }
  s.plan_dirty = true;
  return placed;
}

void DecodeCore::Impl::RunJob(const std::shared_ptr<Session>& sp, const std::shared_ptr<Job>& job,
                              const indexer::PredictArgs& args) {
  Session& s = *sp;
  auto finish = [&](absl::Status st) {
    absl::MutexLock l(&s.mu);
    job->status = std::move(st);
    job->done = true;
    s.job_cv.SignalAll();
  };
  absl::StatusOr<indexer::Prediction> pred;
  if (job->catch_up) {
    pred = indexer::Prediction{};
    float score = static_cast<float>(job->pages.size());
    for (uint64_t p : job->pages) pred->pages.push_back({p, score--});
  } else {
    pred = RetryTransient(s, [&]() -> absl::StatusOr<indexer::Prediction> {
      if (absl::Status flushed =
              [&] {
                absl::MutexLock l(&s.mu);
                return Flush(s);
              }();
          !flushed.ok())
        return flushed;
      auto p = predictor->Predict(s.id, args);
      if (absl::IsNotFound(p.status())) {  // the indexer lost the session: give it again
        absl::Status again = [&] {
          absl::MutexLock l(&s.mu);
          return s.closed ? p.status() : Reregister(s);
        }();
        p = again.ok() ? predictor->Predict(s.id, args) : again;
      }
      return p;
    });
  }
  if (!pred.ok()) {
    finish(pred.status());
    return;
  }
  std::vector<uint64_t> pages;
  std::vector<uint8_t*> dst;
  {
    absl::MutexLock l(&s.mu);
    if (s.closed) {
      job->status = absl::CancelledError("session closed");
      job->done = true;
      s.job_cv.SignalAll();
      return;
    }
    // The sealed pages of the answer, most wanted first; those not resident are missing.
    std::vector<indexer::ScoredPage> scored;
    for (const auto& p : pred->pages)
      if (p.page < job->args.history_pages) scored.push_back(p);  // the open page is resident
    std::stable_sort(scored.begin(), scored.end(),
                     [](const indexer::ScoredPage& a, const indexer::ScoredPage& b) {
                       return a.score > b.score;
                     });
    std::vector<uint64_t> missing;
    for (const auto& p : scored) {
      job->wanted.push_back(p.page);
      if (!job->catch_up) job->ranked.push_back(p.page);
      if (!std::binary_search(job->resident.begin(), job->resident.end(), p.page))
        missing.push_back(p.page);
    }
    std::sort(job->wanted.begin(), job->wanted.end());
    const size_t take = std::min<size_t>(missing.size(), job->cells.size());
    std::vector<uint64_t> dropped(missing.begin() + take, missing.end());
    job->deferred_pages = dropped;
    std::sort(dropped.begin(), dropped.end());
    job->wanted.erase(std::remove_if(job->wanted.begin(), job->wanted.end(),
                                     [&](uint64_t p) {
                                       return std::binary_search(dropped.begin(), dropped.end(), p);
                                     }),
                      job->wanted.end());
    for (size_t i = 0; i < take; ++i) {
      const uint32_t c = job->cells[i];
      job->fetched.push_back({missing[i], c});
      pages.push_back(missing[i]);
      dst.push_back(Cell(c));
    }
  }
  absl::Status st = pages.empty() ? absl::OkStatus() : RetryTransient(s, [&] {
    return store->Read(s.id, pages, s.opt.spec.PageBytes(), dst);
  });
  absl::MutexLock l(&s.mu);
  if (!st.ok()) job->fetched.clear();  // the cells go back with the job
  job->status = st;
  job->done = true;
  s.job_cv.SignalAll();
}

void DecodeCore::Impl::Install(const std::shared_ptr<Session>& sp, uint64_t step) {
  Session& s = *sp;
  std::shared_ptr<Job> job = std::move(s.job);
  if (!job->status.ok()) {
    ReleaseCells(s, *job, true);
    ++s.stats.prediction_failures;
    ++totals.prediction_failures;
    FM_LOG_WARN(
        "decode: session \"%s\": the prediction of step %llu failed (%s); the "
        "current set keeps serving",
        s.id.c_str(), static_cast<unsigned long long>(job->step), job->status.ToString().c_str());
    return;
  }
  Place(s, *job);
  DeferLost(s, *job);
  s.stats.fetched_pages += job->fetched.size();
  totals.fetched_pages += job->fetched.size();
  if (!job->catch_up) s.stats.deferred_pages += job->deferred_pages.size();
  if (job->catch_up) {
    std::vector<uint64_t> merged;
    std::set_union(s.wanted.begin(), s.wanted.end(), job->wanted.begin(), job->wanted.end(),
                   std::back_inserter(merged));
    s.wanted = std::move(merged);
  } else {
    s.wanted = std::move(job->wanted);
    s.ranked = std::move(job->ranked);
  }
  s.have_set = true;
  s.plan_dirty = true;
  Trim(s);
  // Pages that did not fit while the previous set served come now, into the cells it left,
  // most wanted first, lag_pages per catch-up lag (a catch-up that leaves pages over posts
  // the next), serving before the next cycle starts.
  const uint64_t next = (step / s.tau + 1) * s.tau;
  if (!job->deferred_pages.empty() && step + s.catch_up_lag < next) {
    const uint64_t n =
        std::min<uint64_t>({job->deferred_pages.size(), Spare(s, KeepFree(s)), s.lag_pages});
    if (n > 0) PostCatchUp(sp, job->deferred_pages, n, step + s.catch_up_lag);
  }
}

void DecodeCore::Impl::DeferLost(const Session& s, Job& job) {
  std::vector<uint64_t> lost;
  for (uint64_t p : job.wanted)
    if (s.cell_of[p] == kNoCell) lost.push_back(p);
  if (lost.empty()) return;
  std::vector<uint64_t> kept, later = job.deferred_pages;
  std::set_difference(job.wanted.begin(), job.wanted.end(), lost.begin(), lost.end(),
                      std::back_inserter(kept));
  job.wanted = std::move(kept);
  later.insert(later.end(), lost.begin(), lost.end());
  std::sort(later.begin(), later.end());
  job.deferred_pages.clear();
  for (uint64_t p : job.catch_up ? job.pages : job.ranked)
    if (std::binary_search(later.begin(), later.end(), p)) job.deferred_pages.push_back(p);
}

void DecodeCore::Impl::PostCatchUp(const std::shared_ptr<Session>& sp,
                                   const std::vector<uint64_t>& pages, uint64_t cells,
                                   uint64_t at) {
  indexer::PredictArgs none;
  none.step = at;
  none.history_pages = sp->sealed();
  sp->switch_step = at;
  Post(sp, NewJob(none, &pages, ResidentPages(*sp)), cells);
}

}  // namespace fm::decode
