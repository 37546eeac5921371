#include "services/decode/decode_core_impl.h"
#include "services/decode/session_proto.h"

namespace fm::decode {

const char* ModeName(Mode m) {
  return m == Mode::kDense ? "dense" : m == Mode::kTrace ? "trace" : "sparse";
}

size_t KeysRecordBytes(const ModelSpec& spec) {
  return size_t{spec.index_layers} * spec.ChunksPerPage() * spec.IndexKeyBytes() +
         indexer::IndexerBoundsFloats(spec) * 4;
}

absl::StatusOr<Mode> ParseMode(const std::string& name) {
  if (name == "sparse") return Mode::kSparse;
  if (name == "dense") return Mode::kDense;
  if (name == "trace") return Mode::kTrace;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown mode \"", name, "\"; want sparse, dense or trace"));
}

DecodeCore::DecodeCore(const DecodeOptions& options, PageStore* store, Predictor* predictor)
    : impl_(std::make_unique<Impl>(options, store, predictor)) {}

DecodeCore::~DecodeCore() {
  // Wait for jobs in flight: they hold their sessions and touch the arena.
  std::vector<std::shared_ptr<Session>> all;
  {
    absl::ReaderMutexLock l(&impl_->mu);
    for (auto& [id, s] : impl_->sessions) all.push_back(s);
  }
  for (auto& s : all) {
    absl::MutexLock l(&s->mu);
    s->closed = true;
    s->WaitQuiet();
  }
}

const DecodeOptions& DecodeCore::options() const { return impl_->options; }

uint64_t DecodeCore::cell_payload_bytes() const {
  absl::ReaderMutexLock l(&impl_->mu);
  return impl_->payload_bytes;
}

ReserveStats DecodeCore::Reserve() const {
  absl::ReaderMutexLock l(&impl_->mu);
  ReserveStats r;
  r.cells = impl_->num_cells;
  r.cell_bytes = impl_->cell_stride;
  r.reserved_cells = impl_->reserved_cells;
  r.used_cells = impl_->num_cells - impl_->free_cells.size();
  r.sessions = impl_->sessions.size();
  const Impl::Totals& t = impl_->totals;
  r.steps = t.steps.load();
  r.stalls = t.stalls.load();
  r.catch_up_stalls = t.catch_up_stalls.load();
  r.stall_us = t.stall_us.load();
  r.predictions = t.predictions.load();
  r.prediction_failures = t.prediction_failures.load();
  r.fetched_pages = t.fetched_pages.load();
  r.surprise_fetches = t.surprise_fetches.load();
  r.reregistrations = t.reregistrations.load();
  r.peer_retries = t.peer_retries.load();
  return r;
}

absl::Status DecodeCore::Open(const std::string& id, const SessionOptions& o) {
  if (absl::Status st = ValidateSessionId(id); !st.ok()) return st;
  if (absl::Status st = impl_->Claim(id); !st.ok()) return st;
  absl::Status st = OpenClaimed(id, o);
  impl_->Unclaim(id);
  return st;
}

absl::Status DecodeCore::OpenClaimed(const std::string& id, const SessionOptions& o) {
  // The worker becomes the session's owner first: the writes of a worker that held it
  // before are refused from here on, so the state read below is its last. (The claim is a
  // write of the session: it also lifts a kvstore's close mark, so that the closed-session
  // TTL cannot delete a session a worker serves.)
  absl::StatusOr<uint64_t> epoch = impl_->store->ClaimSession(id);
  if (!epoch.ok())
    return absl::Status(
        epoch.status().code(),
        absl::StrCat("claiming session \"", id, "\" in the kvstore: ", epoch.status().message()));
  if (!o.resume) return impl_->Create(id, o, nullptr, *epoch);
  // The state is read with the id claimed, so that a close of it on this worker has saved
  // its last state first.
  auto blob = impl_->store->ReadPayload(id, kStatePage);
  if (absl::IsNotFound(blob.status()))
    return absl::NotFoundError(absl::StrCat("no saved state of session \"", id, "\" to resume"));
  if (!blob.ok()) return blob.status();
  flashmemory::v1::DecodeSessionState saved;
  if (!saved.ParseFromString(*blob))
    return absl::DataLossError(absl::StrCat("the saved state of \"", id, "\" does not parse"));
  if (saved.layout() > kStateLayout)
    return absl::FailedPreconditionError(absl::StrCat(
        "the saved state of \"", id, "\" has layout ", saved.layout(),
        ", newer than this worker's (", kStateLayout, "): resume it on a newer worker"));
  flashmemory::v1::DecodeSessionState upgraded;
  if (saved.layout() == 0) upgraded = UpgradeState(saved);
  const flashmemory::v1::DecodeSessionState& st = saved.layout() == 0 ? upgraded : saved;
  absl::StatusOr<SessionOptions> so = SessionOptionsFromProto(st.options());
  if (!so.ok())
    return absl::DataLossError(
        absl::StrCat("the saved state of \"", id, "\" holds bad options: ", so.status().message()));
  if (o.spec.layers != 0 && ModelSpecHash(o.spec) != ModelSpecHash(so->spec))
    return absl::InvalidArgumentError(
        absl::StrCat("session \"", id, "\" was saved with another model spec"));
  return impl_->Create(id, *so, &st, *epoch);
}

absl::Status DecodeCore::Prefill(const std::string& id, const uint8_t* pages, uint64_t n_pages,
                                 uint64_t tokens, const uint8_t* index_keys, uint64_t first_chunk,
                                 uint64_t chunks) {
  auto sp = impl_->Find(id);
  if (!sp) return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  Session& s = *sp;
  Impl& im = *impl_;
  absl::MutexLock l(&s.mu);
  if (absl::Status st = s.Enter(); !st.ok()) return st;
  absl::Cleanup leave = [&s]() ABSL_NO_THREAD_SAFETY_ANALYSIS { s.Leave(); };
  const ModelSpec& spec = s.opt.spec;
  const uint32_t P = spec.page_tokens;
  if (s.decoding) return absl::FailedPreconditionError("prefill after the first decode step");
  if (s.partial_prefill && n_pages > 0)
    return absl::FailedPreconditionError("the previous prefill ended in a partial page");
  if (n_pages == 0 && tokens != s.tokens)
    return absl::InvalidArgumentError(
        absl::StrCat("no pages, yet a history of ", tokens, " tokens; the session has ", s.tokens));
  if (n_pages > 0 && (tokens <= s.tokens || tokens > s.tokens + n_pages * P ||
                      tokens <= s.tokens + (n_pages - 1) * P))
    return absl::InvalidArgumentError(absl::StrCat(n_pages, " pages after ", s.tokens,
                                                   " tokens cannot hold a history of ", tokens,
                                                   " tokens (every page but the last is full)"));
  if (tokens > s.opt.max_tokens)
    return absl::ResourceExhaustedError(
        absl::StrCat(tokens, " tokens exceed the session's max_tokens ", s.opt.max_tokens));
  if (first_chunk != s.key_chunks)
    return absl::InvalidArgumentError(
        absl::StrCat("index keys start at chunk ", first_chunk, "; expected ", s.key_chunks));
  if (first_chunk + chunks > tokens / spec.chunk_tokens)
    return absl::InvalidArgumentError(
        absl::StrCat("index keys of ", first_chunk + chunks, " chunks for ", tokens, " tokens"));
  if (chunks > 0 && !index_keys) return absl::InvalidArgumentError("index keys missing");
  const size_t pb = spec.PageBytes(), kb = spec.IndexKeyBytes();
  const size_t bf = indexer::IndexerBoundsFloats(spec);
  // The K and V of every token the pages carry must be finite (a step's are checked too).
  const size_t es = DTypeSize(spec.dtype);
  for (uint64_t i = 0; i < n_pages; ++i) {
    const uint64_t page = s.tokens / P + i;
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(P, tokens - page * P));
    for (uint32_t l = 0; l < spec.layers; ++l)
      for (uint32_t kv = 0; kv < 2; ++kv)
        for (uint32_t h = 0; h < spec.kv_heads; ++h)
          if (!AllFiniteElems(spec.dtype, pages + i * pb + spec.ElemOffset(l, kv, h, 0) * es,
                              size_t{valid} * spec.head_dim))
            return absl::InvalidArgumentError(
                absl::StrCat("prefill page ", page, " holds a NaN or infinity (layer ", l, ", ",
                             kv ? "V" : "K", ", kv head ", h, ")"));
  }
  // Every page is stored before any state changes, so a failed call can be retried whole.
  for (uint64_t i = 0; i < n_pages; ++i) {
    const uint64_t page = s.tokens / P + i;
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(P, tokens - page * P));
    if (absl::Status st = im.PutPage(s, page, pages + i * pb, valid); !st.ok()) return st;
  }
  for (uint64_t i = 0; i < n_pages; ++i) {
    const uint64_t page = s.tokens / P;
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(P, tokens - page * P));
    const uint8_t* payload = pages + i * pb;
    // The open page's cell receives the page; a full page then seals and a new one opens.
    std::memcpy(im.Payload(static_cast<uint32_t>(s.cell_of[page])), payload, pb);
    s.tokens += valid;
    s.plan_dirty = true;
    if (valid < P) {
      s.partial_prefill = true;
      break;
    }
    if (s.opt.mode == Mode::kSparse) {
      s.bounds.resize(s.bounds.size() + bf);
      im.PageBounds(s, payload, valid, s.bounds.data() + s.bounds.size() - bf);
      im.KeepCheckBounds(s, s.bounds.data() + s.bounds.size() - bf);
      s.bound_pages = page + 1;
    }
    im.Trim(s);
    if (absl::Status st = im.EnsureOpenCell(s); !st.ok()) return st;
  }
  if (s.trace) s.trace->AddKeys(index_keys, chunks);
  if (s.opt.mode == Mode::kSparse)  // dense sessions never ask the indexer
    for (uint32_t l = 0; l < spec.index_layers; ++l)
      s.keys[l].insert(s.keys[l].end(), index_keys + (size_t{l} * chunks) * kb,
                       index_keys + (size_t{l} * chunks + chunks) * kb);
  im.KeepCheckKeys(s, index_keys, chunks, chunks * kb);
  s.key_chunks += chunks;
  // The keys records of the prefill (a failure leaves them to the first flush).
  if (s.opt.mode == Mode::kSparse) (void)im.PersistKeys(s);
  s.stats.tokens = s.tokens;
  // The state a resuming worker starts from, so that a worker lost before the session's
  // first seal leaves it resumable from step 0 (in sparse mode this hands the indexer the
  // prefill's keys now rather than at the first step). A store or indexer that is down only
  // delays it, as at a seal.
  (void)im.SaveState(s);
  return absl::OkStatus();
}

absl::Status DecodeCore::Close(const std::string& id, bool drop_history) {
  return Close(id, drop_history, true);
}

absl::Status DecodeCore::Close(const std::string& id, bool drop_history, bool save) {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock l(&impl_->mu);
    auto it = impl_->sessions.find(id);
    if (it == impl_->sessions.end())
      return impl_->pending.count(id)
                 ? absl::UnavailableError(absl::StrCat(
                       "session \"", id, "\" is being opened or closed by another call; retry"))
                 : absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
    s = it->second;
    impl_->sessions.erase(it);
    impl_->pending.insert(id);  // until its state is saved: a resume of it waits for that
  }
  absl::Status st = impl_->CloseSession(*s, drop_history, save);
  impl_->Unclaim(id);
  return st;
}

absl::Status DecodeCore::Impl::CloseSession(Session& s, bool drop_history, bool save) {
  absl::MutexLock l(&s.mu);
  s.closing = true;
  while (s.busy || s.in_kernel) s.job_cv.Wait(&s.mu);
  s.closed = true;
  s.WaitQuiet();  // a fetch or check of it in flight ends first
  absl::Status st = absl::OkStatus();
  const uint32_t P = s.opt.spec.page_tokens;
  const std::string& id = s.id;
  if (s.moved) {  // another worker owns it: nothing of it is this worker's to save or drop
    Release(s);
    return s.MovedError();
  }
  if (drop_history) {
    st = store->DeleteSession(id, s.epoch);
    if (absl::IsNotFound(st)) st = absl::OkStatus();
    if (s.registered) st.Update(predictor->Drop(id));
  } else if (save) {
    // The open page's tokens so far and the decode state, so that any worker can resume;
    // the indexer forgets the session (a resume gives it the history again from the keys
    // records), so that closed sessions do not fill it. A close that saved reports no error
    // of the indexer's.
    const uint64_t open = s.open_page();
    if (s.tokens % P != 0)
      st = PutPage(s, open, Payload(static_cast<uint32_t>(s.cell_of[open])),
                   static_cast<uint32_t>(s.tokens % P));
    if (st.ok()) st = SaveState(s, /*to_indexer=*/false);
    if (st.ok() && s.registered) {
      absl::Status d = predictor->Drop(id);
      if (!d.ok() && !absl::IsNotFound(d))
        FM_LOG_WARN("decode: closed session \"%s\" stays in the indexer: %s", id.c_str(),
                    d.ToString().c_str());
    }
    // The kvstore keeps it for a resume until its closed-session TTL.
    if (st.ok())
      if (absl::Status c = store->CloseSession(id, s.epoch); !c.ok())
        FM_LOG_WARN("decode: the kvstore did not mark session \"%s\" closed: %s", id.c_str(),
                    c.ToString().c_str());
  }
  // A trace-mode session's trace is what it was for: written whether or not its pages stay,
  // and whatever else failed.
  if (s.trace)
    st.Update(s.trace->Write((std::filesystem::path(options.trace_dir) /
                              (s.opt.trace_name.empty() ? TraceFileName(id) : s.opt.trace_name))
                                 .string()));
  Release(s);
  return st;
}

void DecodeCore::Impl::Release(Session& s) {
  if (s.job) ReleaseCells(s, *s.job, true);
  s.job.reset();
  if (s.recovery) ReleaseCells(s, *s.recovery, true);
  s.recovery.reset();
  for (uint64_t p = 0; p < s.cell_of.size(); ++p) Evict(s, p);
  absl::MutexLock rl(&mu);
  reserved_cells -= s.reserved;
  --admitted;
}

absl::StatusOr<SessionStats> DecodeCore::Stats(const std::string& id) const {
  auto s = impl_->Find(id);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  absl::ReaderMutexLock l(&s->mu);
  SessionStats st = s->stats;
  st.next_step = s->next_step;
  st.fetching = s->job && !s->job->done;
  st.tau = s->tau;
  st.switch_lag = s->lag;
  st.total_pages = s->opt.spec.PagesForTokens(s->tokens);
  st.footprint = st.total_pages ? double(st.peak_resident_pages) / st.total_pages : 0;
  return st;
}

absl::StatusOr<ModelSpec> DecodeCore::SessionSpec(const std::string& id) const {
  auto s = impl_->Find(id);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  return s->opt.spec;  // immutable after Open
}

absl::StatusOr<std::vector<bool>> DecodeCore::Resident(const std::string& id,
                                                       const std::vector<uint64_t>& pages) const {
  auto s = impl_->Find(id);
  if (!s) return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  absl::ReaderMutexLock l(&s->mu);
  std::vector<bool> out;
  for (uint64_t p : pages) out.push_back(p < s->cell_of.size() && s->cell_of[p] != kNoCell);
  return out;
}

}  // namespace fm::decode
