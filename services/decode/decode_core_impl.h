// Private to the decode core (services/decode/decode_core.h): the session, the worker's
// implementation and what they share. The implementation's members are defined by concern:
//   decode_core.cc     the public API (open, prefill, close, stats) and the in-process peers
//   admission.cc       admission and footprint planning (cells, lag, cycle), a session's set-up
//   step.cc            one layer of one decode step
//   reserve.cc         the cell reserve: cells, eviction, the attention plan
//   cycle.cc           predictions, their fetches, installs and catch-ups
//   index_feed.cc      the indexer's and the kvstore's feed: keys, bounds, pages
//   miss_check.cc      the per-step miss check and its recovery
//   session_state.cc   the saved decode state (save, restore on resume)
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/codecs.h"
#include "common/log.h"
#include "common/spec_proto.h"
#include "flashmemory/kernels/attention.h"
#include "flashmemory/kernels/level2.h"
#include "flashmemory/kernels/quest.h"
#include "flashmemory/v1/decode.pb.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/thread_pool.h"
#include "services/decode/decode_core.h"
#include "services/decode/miss_sketch.h"

namespace fm::decode {

// The layout of the saved decode state this worker writes (DecodeSessionState.layout).
inline constexpr uint32_t kStateLayout = 2;
// A saved state in layout 2: one in layout 1 (the flat fields) converted, else a copy.
flashmemory::v1::DecodeSessionState UpgradeState(const flashmemory::v1::DecodeSessionState& old);

constexpr int64_t kNoCell = -1;

inline size_t RoundUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline kernels::AttentionShape ShapeOf(const ModelSpec& s) {
  kernels::AttentionShape a;
  a.layers = s.layers;
  a.q_heads = s.q_heads;
  a.kv_heads = s.kv_heads;
  a.head_dim = s.head_dim;
  a.page_tokens = s.page_tokens;
  a.dtype = static_cast<kernels::ElemType>(s.dtype);
  a.scale = s.Scale();
  return a;
}

inline bool AllFinite(absl::Span<const float> v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// Background jobs (predictions and fetches), off the steps' critical path.
class JobRunner {
 public:
  explicit JobRunner(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~JobRunner() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  void Post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> l(mu_);
      queue_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void Work() {
    while (true) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// Pages read into cells taken at a fixed step (so that every worker makes the same
// choices): `fetched` uses the first of `cells`, the rest go back when it is installed.
struct CellFetch {
  std::vector<uint32_t> cells;
  std::vector<std::pair<uint64_t, uint32_t>> fetched;  // page -> cell
};

// A prediction (or a catch-up) in flight: its answer, and the pages it read into cells.
struct Job : CellFetch {
  uint64_t step = 0;
  indexer::PredictArgs args;  // kept so that a resumed session can run it again
  bool done = false;
  absl::Status status;
  std::vector<uint64_t> wanted;          // sealed pages of the new set, ascending
  std::vector<uint64_t> deferred_pages;  // missing pages that did not fit, most wanted first
  std::vector<uint64_t> ranked;          // a prediction's sealed pages, most wanted first
  // A catch-up: fetches pages a switch deferred (no prediction); its set adds to the
  // serving one.
  bool catch_up = false;
  std::vector<uint64_t> pages;
  // What it decides against, fixed when it is posted (a step at a fixed position) so that
  // its answer does not depend on when it runs: the pages sealed then (args.history_pages:
  // a prediction covers that history) and those resident then, ascending (it fetches the
  // others).
  std::vector<uint64_t> resident;
};

struct DecodeCore::Session {
  std::string id;
  SessionOptions opt;
  kernels::AttentionShape shape;
  uint64_t reserved = 0;     // cells the admission granted
  float predict_budget = 1;  // the share of the pages each prediction asks for
  uint64_t lag_pages = 1;    // pages one catch-up (or a prediction before its switch) fetches
  // Cells the predicted set holds between switches and frees at each cycle start (its
  // least wanted pages) for the pages that must serve from the switch.
  uint64_t headroom_pages = 0;
  uint32_t tau = 16;
  uint32_t lag = 8;           // steps after a cycle start at which its set takes over (< tau)
  uint32_t catch_up_lag = 2;  // steps after a switch or catch-up at which the next serves

  absl::Mutex mu;
  bool closed ABSL_GUARDED_BY(mu) = false;
  uint64_t tokens ABSL_GUARDED_BY(mu) = 0;  // history length (complete steps)
  bool partial_prefill ABSL_GUARDED_BY(mu) = false;
  bool decoding ABSL_GUARDED_BY(mu) = false;
  uint64_t next_step ABSL_GUARDED_BY(mu) = 0;
  uint32_t next_layer ABSL_GUARDED_BY(mu) = 0;

  // Residency: page -> cell; cells held (resident, open, or being fetched).
  std::vector<int64_t> cell_of ABSL_GUARDED_BY(mu);
  uint64_t in_use ABSL_GUARDED_BY(mu) = 0;
  std::vector<uint64_t> wanted ABSL_GUARDED_BY(mu);  // the current predicted set (sealed pages)
  std::vector<uint64_t> ranked ABSL_GUARDED_BY(mu);  // its prediction, most wanted first
  bool have_set ABSL_GUARDED_BY(mu) = false;

  // The attention plan over the resident pages + the open page (last).
  std::vector<uint32_t> list_cells ABSL_GUARDED_BY(mu);
  std::vector<uint16_t> list_valid ABSL_GUARDED_BY(mu);
  kernels::DecodePlan plan ABSL_GUARDED_BY(mu);
  bool plan_dirty ABSL_GUARDED_BY(mu) = true;

  // Index keys and Quest bounds not yet handed to the indexer.
  std::vector<std::vector<uint8_t>> keys ABSL_GUARDED_BY(mu);  // [index layer]: from sent_chunks
  uint64_t key_chunks ABSL_GUARDED_BY(mu) = 0;                 // chunks whose keys the worker has
  uint64_t sent_chunks ABSL_GUARDED_BY(mu) = 0;
  std::vector<float> bounds ABSL_GUARDED_BY(mu);  // [page][bounds floats] from sent_pages
  uint64_t bound_pages ABSL_GUARDED_BY(mu) = 0;   // pages whose bounds the worker has
  uint64_t sent_pages ABSL_GUARDED_BY(mu) = 0;
  uint64_t persisted_pages ABSL_GUARDED_BY(mu) = 0;  // keys records stored (kKeysPage + p)
  bool registered ABSL_GUARDED_BY(mu) = false;

  // The step being assembled.
  std::vector<float> hidden ABSL_GUARDED_BY(mu);
  bool have_hidden ABSL_GUARDED_BY(mu) = false;
  std::vector<float> index_query ABSL_GUARDED_BY(mu);        // [index layer][q_heads][head_dim]
  std::unique_ptr<TraceRecorder> trace ABSL_GUARDED_BY(mu);  // trace mode
  std::vector<uint8_t> step_keys ABSL_GUARDED_BY(mu);
  bool have_step_keys ABSL_GUARDED_BY(mu) = false;

  // Miss recovery: Quest bounds of the index layers ([page][index layer][kv][min|max][d])
  // from page 0 on (capacity for every page of max_tokens, reserved at Open, so that a check
  // in flight reads them in place while sealing appends), and the check in flight.
  std::vector<float> check_bounds ABSL_GUARDED_BY(mu);
  // The session's own check, when the index keys hold the model's own K (ModelKeys): the
  // stored keys of every chunk from chunk 0 on, per index layer, to score a flagged page's
  // tokens exactly (not kept over a resume: those pages get the bound alone).
  std::vector<std::vector<uint8_t>> check_keys ABSL_GUARDED_BY(mu);
  // Their low-rank sketches (miss_sketch.h), per index layer, kept with them.
  std::vector<KeySketch> check_sketch ABSL_GUARDED_BY(mu);
  struct Recovery : CellFetch {
    bool done = false;
    bool cancelled = false;  // the session closed before it chose its pages: run it on resume
    uint64_t install_step = 0;
    // The check's input (saved with the state): the query, its log-sum-exps and the pages it
    // checks (those not resident when it launched), so that a run on resume checks the same.
    std::vector<float> q, lse;
    std::vector<uint64_t> pages;
  };
  std::shared_ptr<Recovery> recovery ABSL_GUARDED_BY(mu);

  std::shared_ptr<Job> job ABSL_GUARDED_BY(mu);
  uint64_t switch_step ABSL_GUARDED_BY(mu) = 0;
  uint64_t launched_for ABSL_GUARDED_BY(mu) = UINT64_MAX;  // cycle start of the last launch
  absl::CondVar job_cv;  // a job or miss check finished; the attention kernel returned
  // A step runs its attention kernel with mu released, so that the cycle's prediction and
  // fetch do not wait on it (they take mu to read the page table and to finish). The
  // kernel reads the plan, the page table and the cells of resident pages, which only a
  // step, a prefill or a close change: those wait for in_kernel to clear (WaitIdle).
  bool in_kernel ABSL_GUARDED_BY(mu) = false;
  // A Step or Prefill of the session is running. Its waits (for a fetch, a miss check, the
  // kernel) release mu; busy keeps another Step, Prefill or a Close out until it returns.
  bool busy ABSL_GUARDED_BY(mu) = false;
  // A Close waits for the running Step or Prefill (none enters after it), which finishes
  // whole, before it marks the session closed: a step never returns an error after it
  // changed the session (a launched prediction, an installed set).
  bool closing ABSL_GUARDED_BY(mu) = false;
  // The session's ownership epoch in the kvstore (PageStore::ClaimSession), carried by
  // every write; moved: a write was refused because another worker claimed it since.
  uint64_t epoch = 0;
  bool moved ABSL_GUARDED_BY(mu) = false;

  SessionStats stats ABSL_GUARDED_BY(mu);

  uint64_t sealed() const ABSL_SHARED_LOCKS_REQUIRED(mu) { return tokens / opt.spec.page_tokens; }
  uint64_t open_page() const ABSL_SHARED_LOCKS_REQUIRED(mu) { return sealed(); }

  // Waits until no step of the session is inside its attention kernel.
  void WaitIdle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (in_kernel) job_cv.Wait(&mu);
  }
  // Waits until nothing of the session runs: no step or prefill, job, miss check or
  // attention kernel.
  void WaitQuiet() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while ((job && !job->done) || (recovery && !recovery->done) || in_kernel || busy)
      job_cv.Wait(&mu);
  }
  // Waits for the running Step or Prefill of the session, then marks one running: NOT_FOUND
  // if the session closed meanwhile (a step racing a close fails whole, never half-runs).
  absl::Status Enter() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (busy || in_kernel) job_cv.Wait(&mu);
    if (closed || closing)
      return absl::NotFoundError(absl::StrCat("session \"", id, "\" is closed"));
    if (moved) return MovedError();
    busy = true;
    return absl::OkStatus();
  }
  absl::Status MovedError() const {
    return absl::AbortedError(
        absl::StrCat("session \"", id, "\" moved to another worker (it resumed it there)"));
  }
  void Leave() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    busy = false;
    job_cv.SignalAll();
  }
  // Runs `kernel` with mu released and in_kernel set.
  template <typename F>
  void WithoutLock(F&& kernel) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    in_kernel = true;
    mu.Unlock();
    kernel();
    mu.Lock();
    in_kernel = false;
    job_cv.SignalAll();
  }
};

struct DecodeCore::Impl {
  DecodeOptions options;
  PageStore* store;
  Predictor* predictor;
  JobRunner jobs{2};

  mutable absl::Mutex mu;  // lock order: a session's mu, then this
  std::map<std::string, std::shared_ptr<Session>> sessions ABSL_GUARDED_BY(mu);
  // Ids an Open or Close is working on: one at a time per id, and a session becomes
  // visible to Step only once its Open (a resume's restore included) is complete.
  std::set<std::string> pending ABSL_GUARDED_BY(mu);
  uint64_t admitted ABSL_GUARDED_BY(mu) = 0;  // sessions holding a reservation
  uint8_t* arena ABSL_GUARDED_BY(mu) = nullptr;
  size_t arena_bytes ABSL_GUARDED_BY(mu) = 0;
  bool store_arena ABSL_GUARDED_BY(mu) = false;  // the store's memory (fetches land in place)
  // Totals since the worker started, for its metrics.
  struct Totals {
    std::atomic<uint64_t> steps{0}, stalls{0}, catch_up_stalls{0}, stall_us{0}, predictions{0},
        prediction_failures{0}, fetched_pages{0}, surprise_fetches{0}, reregistrations{0},
        peer_retries{0};
  } totals;
  uint64_t payload_bytes ABSL_GUARDED_BY(mu) = 0;  // page payload per cell
  size_t cell_stride ABSL_GUARDED_BY(mu) = 0;
  uint32_t num_cells ABSL_GUARDED_BY(mu) = 0;
  std::vector<uint32_t> free_cells ABSL_GUARDED_BY(mu);
  uint64_t reserved_cells ABSL_GUARDED_BY(mu) = 0;

  Impl(const DecodeOptions& o, PageStore* s, Predictor* p) : options(o), store(s), predictor(p) {}
  ~Impl() {
    if (arena && !store_arena) kernels::FreePagePoolMemory(arena, arena_bytes);
  }

  // Takes the id for an Open: ALREADY_EXISTS if it is open, UNAVAILABLE while another
  // Open or Close of it runs.
  absl::Status Claim(const std::string& id);
  void Unclaim(const std::string& id);
  // Admits, initialises and (with a saved state) restores a session whose id the caller
  // claimed, and publishes it.
  absl::Status Create(const std::string& id, const SessionOptions& o,
                      const flashmemory::v1::DecodeSessionState* restore, uint64_t epoch);
  // Gives back a quiet session's cells and reservation.
  void Release(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // Close of a session taken out of `sessions`: saves (or drops) its history, writes its
  // trace, releases it.
  absl::Status CloseSession(Session& s, bool drop_history, bool save);

  std::shared_ptr<Session> Find(const std::string& id) const;

  // The arena and its geometry never change after the first Open, so these reads need no
  // lock once a session exists.
  kernels::PagePool Pool() const ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return kernels::PagePool{arena, cell_stride, kPageHeaderBytes, num_cells};
  }
  uint8_t* Cell(uint32_t c) const ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return arena + size_t{c} * cell_stride;
  }
  uint8_t* Payload(uint32_t c) const { return Cell(c) + kPageHeaderBytes; }

  // Takes a cell for the session (within its reservation).
  absl::StatusOr<uint32_t> TakeCell(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  void GiveCell(Session& s, uint32_t c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  void Evict(Session& s, uint64_t page) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Evicts a page of the set, which leaves it: the set is what is resident.
  void EvictFromSet(Session& s, uint64_t page) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // Sealed pages resident now, ascending.
  std::vector<uint64_t> ResidentPages(const Session& s) const ABSL_SHARED_LOCKS_REQUIRED(s.mu);

  // Pages a sparse session keeps whatever the prediction says: sink and tail.
  bool Pinned(const Session& s, uint64_t page) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    const uint64_t sealed = s.sealed();
    return page < options.sink || page + options.tail >= sealed;
  }
  bool Wanted(const Session& s, uint64_t page) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    return std::binary_search(s.wanted.begin(), s.wanted.end(), page);
  }
  // Drops resident sealed pages that are neither pinned nor wanted (sparse mode).
  void Trim(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  absl::Status EnsureOpenCell(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Quest bounds of the index layers of a page: [index layer][kv][min|max][d].
  void PageBounds(const Session& s, const uint8_t* payload, uint32_t valid, float* out) const;

  // Whether the session runs a miss check (the worker's, or its own synchronous one).
  bool Checks(const Session& s) const {
    return s.opt.mode == Mode::kSparse && (options.miss_check || s.opt.miss_ratio > 0);
  }
  // Whether the session's index keys hold the model's own K ([token][kv head][head dim] of
  // each chunk; indexer policy model_query), so that its own miss check can score tokens.
  static bool ModelKeys(const ModelSpec& sp) {
    return sp.index_dim == sp.chunk_tokens * sp.kv_heads * sp.head_dim;
  }
  void KeepCheckKeys(Session& s, const uint8_t* keys, uint64_t chunks, size_t layer_stride)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // The sketch of index layer l's kept keys, brought up to date (nullptr: none kept, or
  // DecodeOptions::miss_sketch_rank is 0).
  const KeySketch* SyncSketch(Session& s, uint32_t l) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // Keeps a page's bounds (the index layers') for the miss check.
  void KeepCheckBounds(Session& s, const float* bounds) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // The miss check of one step's query of index layer `l`: pages among `pages` whose Quest
  // bound of q.k exceeds the resident log-sum-exp by log(ratio) in some head, at most
  // max_pages, most wanted first.
  //
  // With `keys` (the layer's stored keys holding the model's own K, ModelKeys), a page is
  // scored instead (miss_sketch.h): by the bound of the keys' low-rank `sketch` where it
  // covers the page (else the Quest box), then, if that cannot rule it out, exactly from
  // the fp8 keys, so that only a page that would carry more than `ratio` times the
  // resident mass in some head is flagged. *exact counts those scored exactly.
  std::vector<uint64_t> MissCheck(const ModelSpec& sp, uint32_t l, const float* q, const float* lse,
                                  const std::vector<uint64_t>& pages, const float* bounds,
                                  double ratio, uint32_t max_pages,
                                  const std::vector<uint8_t>* keys = nullptr,
                                  const KeySketch* sketch = nullptr,
                                  uint64_t* exact = nullptr) const;

  // Launches the miss check of this step's query (off the critical path).
  void LaunchCheck(const std::shared_ptr<Session>& sp, const float* q, const float* lse)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  void PostCheck(const std::shared_ptr<Session>& sp, const std::shared_ptr<Session::Recovery>& rec,
                 uint64_t cells) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);

  // The session's own miss check (SessionOptions::miss_ratio) of index layer `l`'s query,
  // whose attention over the resident pages gave `lse`: the pages it flags are read now into
  // the spare cells of the reservation (DecodeOptions::miss_max_pages of them are kept for
  // the check), or else into the cells of the set's least wanted pages (the prediction's
  // ranking), and join the set until the next cycle's set takes over; the step waits (a
  // stall) and its attention runs again.
  // *fetched: pages were placed. A failed read costs the check, not the step.
  absl::Status RecoverMisses(Session& s, uint32_t l, const float* q, const float* lse,
                             bool* fetched) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Installs a finished miss check: its pages serve until the next cycle's set.
  void InstallRecovery(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Hands the keys and bounds of sealed pages to the indexer (Register the first time),
  // whole pages whose keys and bounds are both in. Each page's keys and bounds go to the
  // kvstore first (kKeysPage + page), so that an indexer that lost the session (restarted
  // empty, or a replica that took its place) can be given it again: when the indexer answers
  // NOT_FOUND the worker re-registers the history from those records.
  absl::Status Flush(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Sealed pages whose index keys and bounds are both in.
  uint64_t ReadyPages(const Session& s) const ABSL_SHARED_LOCKS_REQUIRED(s.mu);
  // Cells of the reservation not in use, less `keep`.
  static uint64_t Spare(const Session& s, uint64_t keep) ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    return s.reserved > s.in_use + keep ? s.reserved - s.in_use - keep : 0;
  }
  // Cells a prediction or catch-up leaves free: two for pages that seal before the switch,
  // and the miss check's.
  uint64_t KeepFree(const Session& s) const;

  // Writes the keys records (kKeysPage + p) of the sealed pages whose keys and bounds are in
  // and that are not stored yet: at prefill, so that the first steps do not pay for them,
  // and before each flush to the indexer.
  absl::Status PersistKeys(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Gives the indexer the session's history again (the pages it was sent) from the keys
  // records in the kvstore.
  absl::Status Reregister(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Writes a record of the session to the store under its ownership epoch; a store that
  // another worker's claim of the session reached first refuses (ABORTED), and the session
  // is then lost to this worker: every later call of it fails with ABORTED.
  absl::Status Write(Session& s, PageHeaderData h, const uint8_t* payload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Writes a page (its cell's payload) to the store.
  absl::Status PutPage(Session& s, uint64_t page, const uint8_t* payload, uint32_t valid);

  absl::Status RebuildPlan(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Launches the prediction of the cycle starting at s.next_step.
  void Launch(const std::shared_ptr<Session>& sp) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // Frees the headroom the set held since its switch: its least wanted resident pages go,
  // so that the new prediction's most wanted pages can serve from its switch. At a cycle
  // start, a fixed step, so that outputs do not depend on timing.
  void MakeRoom(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // A job of `a` (catch_up: the pages of a catch-up job, no prediction; else null) over
  // the pages sealed at its post (a.history_pages) that fetches those not in `resident`.
  static std::shared_ptr<Job> NewJob(const indexer::PredictArgs& a,
                                     const std::vector<uint64_t>* catch_up,
                                     std::vector<uint64_t> resident);
  // Posts `job` with `cells` cells taken for its fetch.
  void Post(const std::shared_ptr<Session>& sp, const std::shared_ptr<Job>& job, uint64_t cells)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // Gives back a fetch's cells: all of them (failed, or the session closing) or the unused.
  void ReleaseCells(Session& s, CellFetch& f, bool all) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // Puts a finished fetch's pages in the page table (a page already resident gives its new
  // cell back) after releasing the unused cells; returns the pages placed.
  std::vector<uint64_t> Place(Session& s, CellFetch& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  // Writes the session's decode state to the kvstore (kStatePage). to_indexer: hands the
  // indexer the pending keys first (seals, prefills); else (a close) only the kvstore is
  // written.
  absl::Status SaveState(Session& s, bool to_indexer = true) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  absl::Status RestoreState(const std::shared_ptr<Session>& sp,
                            const flashmemory::v1::DecodeSessionState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);

  // Runs fn until it succeeds or fails for good. A peer that is down for a moment (a
  // restart, a lost connection) costs the cycle a wait rather than its prediction: while
  // fn answers UNAVAILABLE, it runs again after a backoff (50 ms, doubling to 500 ms) for up
  // to options.peer_retry_ms, unless the session is closing. The step at the cycle's switch
  // waits for the job, so a retried prediction serves the set an undisturbed run serves.
  template <typename F>
  auto RetryTransient(Session& s, F fn) -> decltype(fn()) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options.peer_retry_ms);
    int backoff_ms = 50;
    for (int tries = 1;; ++tries) {
      auto r = fn();
      absl::Status st;
      if constexpr (std::is_same_v<decltype(r), absl::Status>) {
        st = r;
      } else {
        st = r.status();
      }
      if (!absl::IsUnavailable(st)) return r;
      if (std::chrono::steady_clock::now() >= deadline) {
        FM_LOG_WARN("decode: session \"%s\": a peer stayed unavailable for %u ms (%d tries)",
                    s.id.c_str(), options.peer_retry_ms, tries);
        return r;
      }
      {
        absl::MutexLock l(&s.mu);
        if (s.closed || s.closing) return r;
      }
      ++totals.peer_retries;
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
      backoff_ms = std::min(backoff_ms * 2, 500);
    }
  }

  void RunJob(const std::shared_ptr<Session>& sp, const std::shared_ptr<Job>& job,
              const indexer::PredictArgs& args);

  // Installs a finished job's set at `step`; a failed job leaves the current set serving.
  void Install(const std::shared_ptr<Session>& sp, uint64_t step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);

  // Pages of a finished job's set that were resident when it was posted and have left since
  // (a seal's trim, or room for the open page) join its deferred pages, in its order.
  void DeferLost(const Session& s, Job& job) ABSL_SHARED_LOCKS_REQUIRED(s.mu);

  // Fetches `pages` (most wanted first; as many as `cells` allow) to serve from step `at`.
  void PostCatchUp(const std::shared_ptr<Session>& sp, const std::vector<uint64_t>& pages,
                   uint64_t cells, uint64_t at) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);

  // One layer of one decode step (DecodeCore::Step), the session entered.
  absl::Status StepOne(const std::shared_ptr<Session>& sp, const LayerStep& r)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // StepOne's stages, in order. Where the layer sits: set by ValidateStep (last, chunk,
  // seal) and AppendToken (the open page, its cell and the token's row).
  struct StepPosition {
    bool last = false, completes_chunk = false, seals = false;
    uint64_t open = 0;
    uint8_t* page = nullptr;
    uint32_t row = 0;
  };
  // The request against the session's protocol position and spec; changes nothing.
  absl::Status ValidateStep(const Session& s, const LayerStep& r, StepPosition* at) const
      ABSL_SHARED_LOCKS_REQUIRED(s.mu);
  // Layer 0: the cycle's set takes over at its switch step (waiting for its fetch, a
  // stall), and a finished miss recovery at its install step.
  absl::Status SwitchIfDue(const std::shared_ptr<Session>& sp, const LayerStep& r)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // The layer's inputs (hidden state, index keys, index query) and the token's K and V in
  // the open page; a page this layer completes is stored.
  absl::Status AppendToken(Session& s, const LayerStep& r, StepPosition* at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // At a cycle start, the prediction once its input is in (the first one waited for).
  void LaunchIfDue(const std::shared_ptr<Session>& sp, const LayerStep& r, const StepPosition& at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // The layer's attention over the resident pages (again after a miss recovery), the
  // worker's asynchronous miss check, the trace.
  absl::Status AttendLayer(const std::shared_ptr<Session>& sp, const LayerStep& r,
                           const StepPosition& at) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu);
  // The last layer: the chunk's keys, the step's counters, and a seal.
  absl::Status FinishStep(Session& s, const LayerStep& r, const StepPosition& at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
};

}  // namespace fm::decode
