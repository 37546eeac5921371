#include "services/decode/decode_core.h"
#include "services/decode/miss_sketch.h"

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
#include "services/kvstore/kv_client.h"
#include "services/kvstore/kv_store.h"

namespace fm::decode {
namespace {

constexpr int64_t kNoCell = -1;

size_t RoundUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

kernels::AttentionShape ShapeOf(const ModelSpec& s) {
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

bool AllFinite(absl::Span<const float> v) {
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

}  // namespace

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
  uint64_t reserved = 0;  // cells the admission granted
  float predict_budget = 1;  // the share of the pages each prediction asks for
  uint64_t lag_pages = 1;    // pages one catch-up (or a prediction before its switch) fetches
  // Cells the predicted set holds between switches and frees at each cycle start (its
  // least wanted pages) for the pages that must serve from the switch.
  uint64_t headroom_pages = 0;
  uint32_t tau = 16;
  uint32_t lag = 8;  // steps after a cycle start at which its set takes over (< tau)
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
  std::vector<float> index_query ABSL_GUARDED_BY(mu);  // [index layer][q_heads][head_dim]
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
    return absl::AbortedError(absl::StrCat("session \"", id,
                                           "\" moved to another worker (it resumed it there)"));
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
  absl::Status Claim(const std::string& id) {
    absl::MutexLock l(&mu);
    if (sessions.count(id))
      return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" is already open"));
    if (!pending.insert(id).second)
      return absl::UnavailableError(absl::StrCat(
          "session \"", id, "\" is being opened or closed by another call; retry"));
    return absl::OkStatus();
  }
  void Unclaim(const std::string& id) {
    absl::MutexLock l(&mu);
    pending.erase(id);
  }
  // Admits, initialises and (with a saved state) restores a session whose id the caller
  // claimed, and publishes it.
  absl::Status Create(const std::string& id, const SessionOptions& o,
                      const flashmemory::v1::DecodeSessionState* restore, uint64_t epoch);
  // Gives back a quiet session's cells and reservation.
  void Release(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  // Close of a session taken out of `sessions`: saves (or drops) its history, writes its
  // trace, releases it.
  absl::Status CloseSession(Session& s, bool drop_history, bool save);

  std::shared_ptr<Session> Find(const std::string& id) const {
    absl::ReaderMutexLock l(&mu);
    auto it = sessions.find(id);
    return it == sessions.end() ? nullptr : it->second;
  }

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
  absl::StatusOr<uint32_t> TakeCell(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (s.in_use >= s.reserved)
      return absl::ResourceExhaustedError(
          absl::StrCat("session \"", s.id, "\" holds all ", s.reserved, " of its cells"));
    absl::MutexLock l(&mu);
    if (free_cells.empty()) return absl::InternalError("reserve accounting: no free cell");
    const uint32_t c = free_cells.back();
    free_cells.pop_back();
    ++s.in_use;
    s.stats.peak_resident_pages = std::max(s.stats.peak_resident_pages, s.in_use);
    return c;
  }
  void GiveCell(Session& s, uint32_t c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    absl::MutexLock l(&mu);
    free_cells.push_back(c);
    --s.in_use;
  }
  void Evict(Session& s, uint64_t page) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (page < s.cell_of.size() && s.cell_of[page] != kNoCell) {
      GiveCell(s, static_cast<uint32_t>(s.cell_of[page]));
      s.cell_of[page] = kNoCell;
      s.plan_dirty = true;
    }
  }

  // Evicts a page of the set, which leaves it: the set is what is resident.
  void EvictFromSet(Session& s, uint64_t page) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    Evict(s, page);
    auto w = std::lower_bound(s.wanted.begin(), s.wanted.end(), page);
    if (w != s.wanted.end() && *w == page) s.wanted.erase(w);
  }
  // Sealed pages resident now, ascending.
  std::vector<uint64_t> ResidentPages(const Session& s) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    std::vector<uint64_t> out;
    for (uint64_t p = 0; p < s.sealed(); ++p)
      if (s.cell_of[p] != kNoCell) out.push_back(p);
    return out;
  }

  // Pages a sparse session keeps whatever the prediction says: sink and tail.
  bool Pinned(const Session& s, uint64_t page) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    const uint64_t sealed = s.sealed();
    return page < options.sink || page + options.tail >= sealed;
  }
  bool Wanted(const Session& s, uint64_t page) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    return std::binary_search(s.wanted.begin(), s.wanted.end(), page);
  }
  // Drops resident sealed pages that are neither pinned nor wanted (sparse mode).
  void Trim(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (s.opt.mode != Mode::kSparse) return;
    const uint64_t sealed = s.sealed();
    for (uint64_t p = 0; p < sealed && p < s.cell_of.size(); ++p)
      if (s.cell_of[p] != kNoCell && !Pinned(s, p) && !Wanted(s, p)) Evict(s, p);
  }

  absl::Status EnsureOpenCell(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const uint64_t p = s.open_page();
    if (p >= s.cell_of.size()) return absl::ResourceExhaustedError("session is at max_tokens");
    if (s.cell_of[p] != kNoCell) return absl::OkStatus();
    auto c = TakeCell(s);
    if (!c.ok()) {
      // Make room: the oldest resident page that is neither sink nor tail.
      for (uint64_t q = options.sink; q < s.sealed() && !c.ok(); ++q)
        if (s.cell_of[q] != kNoCell && !Pinned(s, q)) {
          EvictFromSet(s, q);
          c = TakeCell(s);
        }
      if (!c.ok()) return c.status();
    }
    std::memset(Payload(*c), 0, s.opt.spec.PageBytes());
    s.cell_of[p] = *c;
    s.plan_dirty = true;
    return absl::OkStatus();
  }

  // Quest bounds of the index layers of a page: [index layer][kv][min|max][d].
  void PageBounds(const Session& s, const uint8_t* payload, uint32_t valid, float* out) const {
    const ModelSpec& sp = s.opt.spec;
    std::vector<float> all(kernels::QuestBoundsFloats(s.shape));
    kernels::QuestBounds(s.shape, payload, valid, all.data());
    const size_t per_layer = size_t{sp.kv_heads} * 2 * sp.head_dim;
    for (uint32_t l = 0; l < sp.index_layers; ++l)
      std::memcpy(out + l * per_layer,
                  all.data() + indexer::ModelLayerOfIndexLayer(sp, l) * per_layer, per_layer * 4);
  }

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
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (s.opt.miss_ratio <= 0 || s.opt.mode != Mode::kSparse || !ModelKeys(s.opt.spec)) return;
    const ModelSpec& sp = s.opt.spec;
    s.check_keys.resize(sp.index_layers);
    const size_t kb = sp.IndexKeyBytes();
    for (uint32_t l = 0; l < sp.index_layers; ++l)
      s.check_keys[l].insert(s.check_keys[l].end(), keys + l * layer_stride,
                             keys + l * layer_stride + chunks * kb);
    // The keys' sketches follow page by page, so that no check waits for a whole history's.
    for (uint32_t l = 0; l < sp.index_layers; ++l) SyncSketch(s, l);
  }
  // The sketch of index layer l's kept keys, brought up to date (nullptr: none kept, or
  // DecodeOptions::miss_sketch_rank is 0).
  const KeySketch* SyncSketch(Session& s, uint32_t l) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (options.miss_sketch_rank == 0 || l >= s.check_keys.size()) return nullptr;
    if (s.check_sketch.size() < s.check_keys.size())
      s.check_sketch.resize(s.check_keys.size(), KeySketch(options.miss_sketch_rank));
    s.check_sketch[l].Sync(s.opt.spec, s.check_keys[l]);
    return &s.check_sketch[l];
  }
  // Keeps a page's bounds (the index layers') for the miss check.
  void KeepCheckBounds(Session& s, const float* bounds) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (!Checks(s)) return;
    s.check_bounds.insert(s.check_bounds.end(), bounds,
                          bounds + indexer::IndexerBoundsFloats(s.opt.spec));
  }

  // The miss check of one step's query of index layer `l`: pages among `pages` whose Quest
  // bound of q.k exceeds the resident log-sum-exp by log(ratio) in some head, at most
  // max_pages, most wanted first.
  //
  // With `keys` (the layer's stored keys holding the model's own K, ModelKeys), a page is
  // scored instead (miss_sketch.h): by the bound of the keys' low-rank `sketch` where it
  // covers the page (else the Quest box), then, if that cannot rule it out, exactly from
  // the fp8 keys, so that only a page that would carry more than `ratio` times the
  // resident mass in some head is flagged. *exact counts those scored exactly.
  std::vector<uint64_t> MissCheck(const ModelSpec& sp, uint32_t l, const float* q,
                                  const float* lse, const std::vector<uint64_t>& pages,
                                  const float* bounds, double ratio, uint32_t max_pages,
                                  const std::vector<uint8_t>* keys = nullptr,
                                  const KeySketch* sketch = nullptr,
                                  uint64_t* exact = nullptr) const {
    const uint32_t d = sp.head_dim, group = sp.q_heads / sp.kv_heads;
    const float scale = sp.Scale(), margin = static_cast<float>(std::log(ratio));
    const size_t stride = indexer::IndexerBoundsFloats(sp);
    std::vector<std::pair<float, uint64_t>> hot;
    std::vector<float> scratch;
    KeySketch::Query projected;
    if (sketch && sketch->pages() > 0) projected = sketch->Project(sp, q);
    const uint64_t page_key_bytes = sp.ChunksPerPage() * sp.IndexKeyBytes();
    for (uint64_t p : pages) {
      const bool have_keys = keys && (p + 1) * page_key_bytes <= keys->size();
      if (have_keys && sketch && p < sketch->pages()) {
        // The sketch's bound is far tighter than the Quest box (which rules out almost no
        // page of a trained model's keys): the box is skipped.
        if (sketch->PageBound(sp, projected, lse, p, margin, &scratch) <= margin) continue;
        if (exact) ++*exact;
        const float mass =
            ExactPageMass(sp, q, lse, keys->data() + p * page_key_bytes, margin, &scratch);
        if (mass > margin) hot.push_back({mass, p});
        continue;
      }
      const float* b = bounds + p * stride + size_t{l} * sp.kv_heads * 2 * d;
      float best = -std::numeric_limits<float>::infinity();
      for (uint32_t h = 0; h < sp.q_heads; ++h) {
        const float* mn = b + size_t{h / group} * 2 * d;
        const float* mx = mn + d;
        const float* qh = q + size_t{h} * d;
        float ub = 0;
        for (uint32_t j = 0; j < d; ++j) ub += std::max(qh[j] * mn[j], qh[j] * mx[j]);
        best = std::max(best, ub * scale - lse[h]);
      }
      if (have_keys && best + std::log(float(sp.page_tokens)) > margin) {
        if (exact) ++*exact;
        best = ExactPageMass(sp, q, lse, keys->data() + p * page_key_bytes, margin, &scratch);
      }
      if (best > margin) hot.push_back({best, p});
    }
    std::sort(hot.begin(), hot.end(), std::greater<>());
    std::vector<uint64_t> out;
    for (size_t i = 0; i < hot.size() && i < max_pages; ++i) out.push_back(hot[i].second);
    return out;
  }

  // Launches the miss check of this step's query (off the critical path).
  void LaunchCheck(const std::shared_ptr<Session>& sp, const float* q, const float* lse)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
    Session& s = *sp;
    const ModelSpec& spec = s.opt.spec;
    auto rec = std::make_shared<Session::Recovery>();
    rec->install_step = s.next_step + std::max<uint32_t>(1, options.miss_lag);
    rec->q.assign(q, q + size_t{spec.q_heads} * spec.head_dim);
    rec->lse.assign(lse, lse + spec.q_heads);
    const uint64_t have = s.check_bounds.size() / indexer::IndexerBoundsFloats(spec);
    for (uint64_t p = 0; p < std::min(s.sealed(), have); ++p)
      if (s.cell_of[p] == kNoCell) rec->pages.push_back(p);
    PostCheck(sp, rec, std::min<uint64_t>(options.miss_max_pages, Spare(s, 2)));
  }
  void PostCheck(const std::shared_ptr<Session>& sp, const std::shared_ptr<Session::Recovery>& rec,
                 uint64_t cells) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
    Session& s = *sp;
    for (uint64_t i = 0; i < cells; ++i) {
      auto c = TakeCell(s);
      if (!c.ok()) break;
      rec->cells.push_back(*c);
    }
    s.recovery = rec;
    // The pages checked have their bounds already; later seals only append (in capacity).
    const float* bounds = s.check_bounds.data();
    jobs.Post([this, sp, rec, bounds] {
      Session& s = *sp;
      const std::vector<uint64_t> hot =
          MissCheck(s.opt.spec, s.opt.spec.index_layers - 1, rec->q.data(), rec->lse.data(),
                    rec->pages, bounds, options.miss_ratio, options.miss_max_pages);
      std::vector<uint64_t> got;
      std::vector<uint8_t*> dst;
      {
        absl::MutexLock l(&s.mu);
        for (uint64_t p : hot) {
          if (s.closed) {
            rec->cancelled = true;
            break;
          }
          if (rec->fetched.size() == rec->cells.size()) break;
          const uint32_t c = rec->cells[rec->fetched.size()];
          rec->fetched.push_back({p, c});
          got.push_back(p);
          dst.push_back(Cell(c));
        }
      }
      absl::Status st =
          got.empty() ? absl::OkStatus() : store->Read(s.id, got, s.opt.spec.PageBytes(), dst);
      absl::MutexLock l(&s.mu);
      if (!st.ok()) rec->fetched.clear();  // the cells go back at install
      rec->done = true;
      s.job_cv.SignalAll();
    });
  }

  // The session's own miss check (SessionOptions::miss_ratio) of index layer `l`'s query,
  // whose attention over the resident pages gave `lse`: the pages it flags are read now into
  // the spare cells of the reservation (DecodeOptions::miss_max_pages of them are kept for
  // the check), or else into the cells of the set's least wanted pages (the prediction's
  // ranking), and join the set until the next cycle's set takes over; the step waits (a
  // stall) and its attention runs again.
  // *fetched: pages were placed. A failed read costs the check, not the step.
  absl::Status RecoverMisses(Session& s, uint32_t l, const float* q, const float* lse,
                             bool* fetched) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const ModelSpec& spec = s.opt.spec;
    const uint64_t have = s.check_bounds.size() / indexer::IndexerBoundsFloats(spec);
    std::vector<uint64_t> candidates;
    for (uint64_t p = 0; p < std::min(s.sealed(), have); ++p)
      if (s.cell_of[p] == kNoCell) candidates.push_back(p);
    ++s.stats.miss_checks;
    const std::vector<uint8_t>* keys = l < s.check_keys.size() ? &s.check_keys[l] : nullptr;
    const KeySketch* sketch = SyncSketch(s, l);
    const std::vector<uint64_t> hot =
        MissCheck(spec, l, q, lse, candidates, s.check_bounds.data(), s.opt.miss_ratio,
                  options.miss_max_pages, keys, sketch, &s.stats.miss_exact_pages);
    if (hot.empty()) return absl::OkStatus();
    const auto t0 = std::chrono::steady_clock::now();
    CellFetch f;
    // Cells: spare ones first, then those of the set's least wanted pages.
    auto victim = s.ranked.rbegin();
    while (f.cells.size() < hot.size()) {
      if (Spare(s, 2) == 0) {
        while (victim != s.ranked.rend() &&
               (*victim >= s.sealed() || s.cell_of[*victim] == kNoCell || Pinned(s, *victim)))
          ++victim;
        if (victim == s.ranked.rend()) break;
        EvictFromSet(s, *victim++);
        ++s.stats.miss_evictions;
      }
      auto c = TakeCell(s);
      if (!c.ok()) break;
      f.cells.push_back(*c);
    }
    std::vector<uint64_t> got(hot.begin(), hot.begin() + f.cells.size());
    std::vector<uint8_t*> dst;
    for (uint32_t c : f.cells) dst.push_back(Cell(c));
    absl::Status rs;
    if (!got.empty()) s.WithoutLock([&] { rs = store->Read(s.id, got, spec.PageBytes(), dst); });
    if (s.closed || !rs.ok() || got.empty()) {
      ReleaseCells(s, f, true);
      if (s.closed)
        return absl::NotFoundError(absl::StrCat("session \"", s.id, "\" was closed"));
      return absl::OkStatus();
    }
    for (size_t i = 0; i < got.size(); ++i) f.fetched.push_back({got[i], f.cells[i]});
    for (uint64_t p : Place(s, f)) {
      s.wanted.insert(std::upper_bound(s.wanted.begin(), s.wanted.end(), p), p);
      ++s.stats.surprise_fetches;
      ++totals.surprise_fetches;
      *fetched = true;
    }
    ++s.stats.miss_fires;
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ++s.stats.stalls;
    ++totals.stalls;
    s.stats.stall_ms += ms;
    totals.stall_us += static_cast<uint64_t>(ms * 1000);
    return absl::OkStatus();
  }

  // Installs a finished miss check: its pages serve until the next cycle's set.
  void InstallRecovery(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    std::shared_ptr<Session::Recovery> rec = std::move(s.recovery);
    for (uint64_t p : Place(s, *rec)) {
      s.wanted.insert(std::upper_bound(s.wanted.begin(), s.wanted.end(), p), p);
      ++s.stats.surprise_fetches;
      ++totals.surprise_fetches;
    }
  }

  // Hands the keys and bounds of sealed pages to the indexer (Register the first time),
  // whole pages whose keys and bounds are both in. Each page's keys and bounds go to the
  // kvstore first (kKeysPage + page), so that an indexer that lost the session (restarted
  // empty, or a replica that took its place) can be given it again: when the indexer answers
  // NOT_FOUND the worker re-registers the history from those records.
  absl::Status Flush(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const ModelSpec& sp = s.opt.spec;
    const uint64_t cpp = sp.ChunksPerPage();
    const uint64_t ready = ReadyPages(s);
    const uint64_t pages = ready > s.sent_pages ? ready - s.sent_pages : 0;
    const uint64_t chunks = pages * cpp;
    if (s.registered && pages == 0) return absl::OkStatus();
    const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
    std::vector<uint8_t> keys;
    keys.reserve(sp.index_layers * chunks * kb);
    for (uint32_t l = 0; l < sp.index_layers; ++l)
      keys.insert(keys.end(), s.keys[l].begin(), s.keys[l].begin() + chunks * kb);
    if (absl::Status st = PersistKeys(s); !st.ok()) return st;
    auto send = [&] {
      return s.registered ? predictor->Append(s.id, sp, keys.data(), s.sent_chunks, chunks,
                                              s.tokens, s.bounds.data(), s.sent_pages, pages)
                          : predictor->Register(s.id, sp, keys.data(), chunks, s.tokens,
                                                s.bounds.data(), pages);
    };
    absl::Status st = send();
    // The indexer lost the session (NOT_FOUND), or holds an older history of it than this
    // worker sent (FAILED_PRECONDITION: a close's drop that did not reach it): it gets the
    // history again.
    if ((absl::IsNotFound(st) || absl::IsFailedPrecondition(st)) && s.registered) {
      if (absl::Status r = Reregister(s); !r.ok()) return r;
      st = send();
    }
    if (!st.ok()) return st;
    s.registered = true;
    for (uint32_t l = 0; l < sp.index_layers; ++l)
      s.keys[l].erase(s.keys[l].begin(), s.keys[l].begin() + chunks * kb);
    s.bounds.erase(s.bounds.begin(), s.bounds.begin() + pages * bf);
    s.sent_chunks += chunks;
    s.sent_pages += pages;
    return absl::OkStatus();
  }

  // Sealed pages whose index keys and bounds are both in.
  uint64_t ReadyPages(const Session& s) const ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    return std::min({s.key_chunks / s.opt.spec.ChunksPerPage(), s.bound_pages, s.sealed()});
  }
  // Cells of the reservation not in use, less `keep`.
  static uint64_t Spare(const Session& s, uint64_t keep) ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
    return s.reserved > s.in_use + keep ? s.reserved - s.in_use - keep : 0;
  }
  // Cells a prediction or catch-up leaves free: two for pages that seal before the switch,
  // and the miss check's.
  uint64_t KeepFree(const Session& s) const {
    return 2 + (Checks(s) ? options.miss_max_pages : 0);
  }

  // Writes the keys records (kKeysPage + p) of the sealed pages whose keys and bounds are in
  // and that are not stored yet: at prefill, so that the first steps do not pay for them,
  // and before each flush to the indexer.
  absl::Status PersistKeys(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const ModelSpec& sp = s.opt.spec;
    const uint64_t cpp = sp.ChunksPerPage(), ready = ReadyPages(s);
    const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
    std::vector<uint8_t> rec(KeysRecordBytes(sp));
    for (uint64_t p = std::max(s.persisted_pages, s.sent_pages); p < ready; ++p) {
      const uint64_t i = p - s.sent_pages;  // s.keys and s.bounds start at sent_pages
      uint8_t* o = rec.data();
      for (uint32_t l = 0; l < sp.index_layers; ++l, o += cpp * kb)
        std::memcpy(o, s.keys[l].data() + i * cpp * kb, cpp * kb);
      std::memcpy(o, s.bounds.data() + i * bf, bf * 4);
      const PageHeaderData h = MakePageHeader(s.id, kKeysPage + p, ModelSpecHash(sp),
                                              sp.page_tokens, DType::kFp32, rec.data(), rec.size());
      if (absl::Status st = Write(s, h, rec.data()); !st.ok()) return st;
      s.persisted_pages = p + 1;
    }
    return absl::OkStatus();
  }

  // Gives the indexer the session's history again (the pages it was sent) from the keys
  // records in the kvstore.
  absl::Status Reregister(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const ModelSpec& sp = s.opt.spec;
    const uint64_t cpp = sp.ChunksPerPage(), n = s.sent_pages;
    const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
    const size_t rb = KeysRecordBytes(sp);
    std::vector<uint8_t> keys(size_t{sp.index_layers} * n * cpp * kb);
    std::vector<float> bounds(n * bf);
    constexpr uint64_t kBatch = 256;
    std::vector<uint8_t> buf(kBatch * (kPageHeaderBytes + rb));
    for (uint64_t p0 = 0; p0 < n; p0 += kBatch) {
      std::vector<uint64_t> pages;
      std::vector<uint8_t*> dst;
      for (uint64_t p = p0; p < std::min(n, p0 + kBatch); ++p) {
        pages.push_back(kKeysPage + p);
        dst.push_back(buf.data() + (p - p0) * (kPageHeaderBytes + rb));
      }
      if (absl::Status r = store->Read(s.id, pages, rb, dst); !r.ok())
        return absl::Status(r.code(), absl::StrCat("re-registering session \"", s.id,
                                                   "\" with the indexer: ", r.message()));
      for (size_t i = 0; i < pages.size(); ++i) {
        const uint64_t p = p0 + i;
        const uint8_t* in = dst[i] + kPageHeaderBytes;
        for (uint32_t l = 0; l < sp.index_layers; ++l, in += cpp * kb)
          std::memcpy(keys.data() + (size_t{l} * n * cpp + p * cpp) * kb, in, cpp * kb);
        std::memcpy(bounds.data() + p * bf, in, bf * 4);
      }
    }
    if (absl::Status st =
            predictor->Register(s.id, sp, keys.data(), n * cpp, s.tokens, bounds.data(), n);
        !st.ok())
      return st;
    ++s.stats.reregistrations;
    ++totals.reregistrations;
    return absl::OkStatus();
  }

  // Writes a record of the session to the store under its ownership epoch; a store that
  // another worker's claim of the session reached first refuses (ABORTED), and the session
  // is then lost to this worker: every later call of it fails with ABORTED.
  absl::Status Write(Session& s, PageHeaderData h, const uint8_t* payload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    h.epoch = s.epoch;
    absl::Status st = store->Put(h, payload);
    if (absl::IsAborted(st) && !s.moved) {
      s.moved = true;
      FM_LOG_WARN("decode: session \"%s\" moved to another worker: %s", s.id.c_str(),
                  st.ToString().c_str());
    }
    return st;
  }

  // Writes a page (its cell's payload) to the store.
  absl::Status PutPage(Session& s, uint64_t page, const uint8_t* payload, uint32_t valid) {
    const ModelSpec& sp = s.opt.spec;
    const PageHeaderData h =
        MakePageHeader(s.id, page, ModelSpecHash(sp), valid, sp.dtype, payload, sp.PageBytes());
    return Write(s, h, payload);
  }

  absl::Status RebuildPlan(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    s.list_cells.clear();
    s.list_valid.clear();
    const uint64_t open = s.open_page();
    for (uint64_t p = 0; p < open; ++p)
      if (s.cell_of[p] != kNoCell) {
        s.list_cells.push_back(static_cast<uint32_t>(s.cell_of[p]));
        s.list_valid.push_back(static_cast<uint16_t>(s.opt.spec.page_tokens));
      }
    s.list_cells.push_back(static_cast<uint32_t>(s.cell_of[open]));
    s.list_valid.push_back(1);  // set per step
    s.stats.resident_pages = s.list_cells.size();
    kernels::PageList list{s.list_cells.data(), s.list_valid.data(),
                           static_cast<uint32_t>(s.list_cells.size())};
    std::string why;
    const uint32_t threads =
        options.threads ? options.threads : kernels::ThreadPool::Default().size();
    if (kernels::BuildDecodePlan(s.shape, {list}, Pool(), threads, 8, &s.plan, &why) !=
        kernels::KernelStatus::kOk)
      return absl::InternalError(absl::StrCat("attention plan: ", why));
    s.plan_dirty = false;
    return absl::OkStatus();
  }

  // Launches the prediction of the cycle starting at s.next_step.
  void Launch(const std::shared_ptr<Session>& sp) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
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
    Post(sp, NewJob(a, nullptr, ResidentPages(s)),
         s.have_set ? std::min(spare, s.lag_pages) : spare);
  }
  // Frees the headroom the set held since its switch: its least wanted resident pages go,
  // so that the new prediction's most wanted pages can serve from its switch. At a cycle
  // start, a fixed step, so that outputs do not depend on timing.
  void MakeRoom(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    uint64_t spare = Spare(s, KeepFree(s));
    for (auto it = s.ranked.rbegin(); it != s.ranked.rend() && spare < s.headroom_pages; ++it)
      if (*it < s.sealed() && s.cell_of[*it] != kNoCell && !Pinned(s, *it)) {
        EvictFromSet(s, *it);
        ++spare;
      }
  }
  // A job of `a` (catch_up: the pages of a catch-up job, no prediction; else null) over
  // the pages sealed at its post (a.history_pages) that fetches those not in `resident`.
  static std::shared_ptr<Job> NewJob(const indexer::PredictArgs& a,
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
  // Posts `job` with `cells` cells taken for its fetch.
  void Post(const std::shared_ptr<Session>& sp, const std::shared_ptr<Job>& job, uint64_t cells)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
    for (uint64_t i = 0; i < cells; ++i) {
      auto c = TakeCell(*sp);
      if (!c.ok()) break;
      job->cells.push_back(*c);
    }
    sp->job = job;
    jobs.Post([this, sp, job] { RunJob(sp, job, job->args); });
  }
  // Gives back a fetch's cells: all of them (failed, or the session closing) or the unused.
  void ReleaseCells(Session& s, CellFetch& f, bool all) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    for (size_t i = all ? 0 : f.fetched.size(); i < f.cells.size(); ++i) GiveCell(s, f.cells[i]);
    f.cells.clear();
    if (all) f.fetched.clear();
  }
  // Puts a finished fetch's pages in the page table (a page already resident gives its new
  // cell back) after releasing the unused cells; returns the pages placed.
  std::vector<uint64_t> Place(Session& s, CellFetch& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
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
      job->wanted.erase(
          std::remove_if(
              job->wanted.begin(), job->wanted.end(),
              [&](uint64_t p) { return std::binary_search(dropped.begin(), dropped.end(), p); }),
          job->wanted.end());
      for (size_t i = 0; i < take; ++i) {
        const uint32_t c = job->cells[i];
        job->fetched.push_back({missing[i], c});
        pages.push_back(missing[i]);
        dst.push_back(Cell(c));
      }
    }
    absl::Status st =
        pages.empty() ? absl::OkStatus() : RetryTransient(s, [&] {
          return store->Read(s.id, pages, s.opt.spec.PageBytes(), dst);
        });
    absl::MutexLock l(&s.mu);
    if (!st.ok()) job->fetched.clear();  // the cells go back with the job
    job->status = st;
    job->done = true;
    s.job_cv.SignalAll();
  }

  // Installs a finished job's set at `step`; a failed job leaves the current set serving.
  void Install(const std::shared_ptr<Session>& sp, uint64_t step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
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
      const uint64_t n = std::min<uint64_t>(
          {job->deferred_pages.size(), Spare(s, KeepFree(s)), s.lag_pages});
      if (n > 0) PostCatchUp(sp, job->deferred_pages, n, step + s.catch_up_lag);
    }
  }

  // Pages of a finished job's set that were resident when it was posted and have left since
  // (a seal's trim, or room for the open page) join its deferred pages, in its order.
  void DeferLost(const Session& s, Job& job) ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
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

  // Fetches `pages` (most wanted first; as many as `cells` allow) to serve from step `at`.
  void PostCatchUp(const std::shared_ptr<Session>& sp, const std::vector<uint64_t>& pages,
                   uint64_t cells, uint64_t at) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sp->mu) {
    indexer::PredictArgs none;
    none.step = at;
    none.history_pages = sp->sealed();
    sp->switch_step = at;
    Post(sp, NewJob(none, &pages, ResidentPages(*sp)), cells);
  }

  absl::Status StepOne(const std::shared_ptr<Session>& sp, const LayerStep& r);
};

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
  const uint64_t sent_pages =
      to_indexer ? s.sent_pages : std::max(s.sent_pages, s.persisted_pages);
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

uint32_t AutoSwitchLag(const ModelSpec& sp, double predicted_share) {
  const double scan = double(sp.ChunksPerPage()) * sp.index_layers * sp.index_heads * sp.index_dim;
  const double attend = double(sp.page_tokens) * sp.layers * sp.q_heads * sp.head_dim * 2 *
                        std::max(predicted_share, 1e-6);
  return static_cast<uint32_t>(std::clamp(1 + std::ceil(2 * scan / attend), 2.0, 8.0));
}

double AutoCatchUpShare(uint32_t catch_up_lag) { return std::min(1.0, catch_up_lag / 8.0); }

uint32_t AutoCycle(uint32_t switch_lag) {
  uint32_t tau = 8;
  while (tau < 64 && 2 * tau < 5 * switch_lag) tau *= 2;
  return tau;
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
    return absl::Status(epoch.status().code(), absl::StrCat("claiming session \"", id,
                                                            "\" in the kvstore: ",
                                                            epoch.status().message()));
  if (!o.resume) return impl_->Create(id, o, nullptr, *epoch);
  // The state is read with the id claimed, so that a close of it on this worker has saved
  // its last state first.
  auto blob = impl_->store->ReadPayload(id, kStatePage);
  if (absl::IsNotFound(blob.status()))
    return absl::NotFoundError(absl::StrCat("no saved state of session \"", id, "\" to resume"));
  if (!blob.ok()) return blob.status();
  flashmemory::v1::DecodeSessionState st;
  if (!st.ParseFromString(*blob))
    return absl::DataLossError(absl::StrCat("the saved state of \"", id, "\" does not parse"));
  SessionOptions so;
  so.spec = SpecFromProto(st.spec());
  if (o.spec.layers != 0 && ModelSpecHash(o.spec) != ModelSpecHash(so.spec))
    return absl::InvalidArgumentError(
        absl::StrCat("session \"", id, "\" was saved with another model spec"));
  so.mode = st.mode() == flashmemory::v1::DECODE_MODE_DENSE ? Mode::kDense : Mode::kSparse;
  so.policy = static_cast<indexer::Policy>(st.policy());
  so.budget = st.budget();
  so.max_pages = st.max_pages();
  so.tau = st.tau();
  so.switch_lag = st.switch_lag();
  so.level2_topk = st.level2_topk();
  so.miss_ratio = st.miss_ratio();
  so.max_tokens = st.max_tokens();
  return impl_->Create(id, so, &st, *epoch);
}

absl::Status DecodeCore::Impl::Create(const std::string& id, const SessionOptions& o,
                                      const flashmemory::v1::DecodeSessionState* restore,
                                      uint64_t epoch) {
  if (absl::Status st = o.spec.Validate(); !st.ok()) return st;
  const ModelSpec& sp = o.spec;
  if (sp.index_layers == 0 || sp.index_dim == 0)
    return absl::InvalidArgumentError("the spec has no index layers; the worker needs them");
  if (o.max_tokens == 0 || o.max_tokens > kMaxSessionTokens)
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be in [1, ", kMaxSessionTokens, "] (it sizes the reservation), got ",
                     o.max_tokens));
  if (o.tau > kMaxTau)
    return absl::InvalidArgumentError(
        absl::StrCat("tau must be in [0, ", kMaxTau, "] (0 = the worker's), got ", o.tau));
  if (o.mode == Mode::kSparse && o.max_pages == 0 && !(o.budget > 0.0f && o.budget <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("budget must be in (0, 1], got ", o.budget));
  if (o.mode == Mode::kSparse && o.policy == indexer::Policy::kOracle &&
      o.oracle_page_mass.empty())
    return absl::InvalidArgumentError(
        "policy oracle needs the future attention (oracle_page_mass): evaluation only");
  if (!o.oracle_page_mass.empty() &&
      o.oracle_page_mass.size() % o.spec.PagesForTokens(o.max_tokens) != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "oracle_page_mass has ", o.oracle_page_mass.size(), " values; expected steps x ",
        o.spec.PagesForTokens(o.max_tokens), " (the pages of max_tokens)"));
  if (const uint32_t tau = o.tau ? o.tau : options.tau;
      tau != 0 && o.switch_lag > std::max<uint32_t>(1, tau - 1))
    return absl::InvalidArgumentError(absl::StrCat("switch_lag must be below tau (", tau,
                                                   "), got ", o.switch_lag));
  if (!(o.miss_ratio >= 0 && std::isfinite(o.miss_ratio)))
    return absl::InvalidArgumentError(
        absl::StrCat("miss_ratio must be a finite number >= 0 (0 = off), got ", o.miss_ratio));
  if (o.level2_topk > kernels::kMaxLevel2TopK)
    return absl::InvalidArgumentError(absl::StrCat("level2_topk must be in [0, ",
                                                   kernels::kMaxLevel2TopK, "], got ",
                                                   o.level2_topk));
  if (o.level2_topk > 0 && o.mode == Mode::kTrace)
    return absl::InvalidArgumentError("trace mode records dense attention: level2_topk must be 0");
  const DecodeOptions& opt = options;
  if (!o.trace_name.empty() && (o.mode != Mode::kTrace || !IsPlainFileName(o.trace_name)))
    return absl::InvalidArgumentError(absl::StrCat(
        "trace_path \"", o.trace_name,
        "\" must be a plain file name ([A-Za-z0-9._-]) of a trace-mode session"));
  if (o.mode == Mode::kTrace && opt.trace_dir.empty())
    return absl::FailedPreconditionError(
        "this worker writes no traces: start it with a trace directory (--trace_dir)");
  const uint64_t pages = sp.PagesForTokens(o.max_tokens);
  uint64_t cells = pages + 1;
  float predict_budget = 1.0f;
  uint64_t headroom_pages = 0;
  // The budget caps the cells a sparse session holds (its footprint): the predicted set, the
  // open page, two cells for pages sealing before a switch and the miss check's pages all
  // come out of it. Below the minimum that serves sink + tail, or the floor of a session
  // with its own miss check (DecodeOptions::min_session_cells), that minimum. The fetch
  // headroom is a share of the set that each cycle start frees (MakeRoom).
  if (o.mode == Mode::kSparse) {
    const double headroom = std::max(opt.headroom, 0.0);
    const uint64_t miss = opt.miss_check || o.miss_ratio > 0 ? opt.miss_max_pages : 0;
    const uint64_t fixed = std::min<uint64_t>(pages, uint64_t{opt.sink} + opt.tail + 1);
    const uint64_t extra = 3 + miss;
    const uint64_t least =
        fixed + static_cast<uint64_t>(std::ceil(headroom * double(fixed))) + extra;
    const uint64_t cap = std::max<uint64_t>(
        o.max_pages ? o.max_pages : static_cast<uint64_t>(std::ceil(double(o.budget) * pages)),
        o.miss_ratio > 0 && !o.max_pages ? opt.min_session_cells : 0);
    // A cap of every page keeps every page resident, the extra cells on top.
    cells = cap >= pages ? pages + extra : std::min(std::max(cap, least), pages + extra);
    const uint64_t predicted = cap >= pages ? pages : std::min<uint64_t>(pages, cells - extra);
    headroom_pages =
        cap >= pages ? 0
                     : predicted - static_cast<uint64_t>(double(predicted) / (1.0 + headroom));
    // As a fraction of the most pages, so that a history still growing gets its share.
    predict_budget = static_cast<float>(double(std::max<uint64_t>(predicted, 1)) / pages *
                                        (1.0 - 1e-6));
  }
  uint32_t lag = o.switch_lag     ? o.switch_lag
                 : opt.switch_lag ? opt.switch_lag
                                  : AutoSwitchLag(sp, predict_budget);
  auto s = std::make_shared<Session>();
  s->id = id;
  s->epoch = epoch;
  s->opt = o;
  s->shape = ShapeOf(sp);
  s->reserved = cells;
  s->predict_budget = predict_budget;
  s->headroom_pages = headroom_pages;
  s->tau = o.tau ? o.tau : opt.tau ? opt.tau : AutoCycle(lag);
  s->lag = std::max<uint32_t>(1, std::min<uint32_t>(lag, s->tau > 1 ? s->tau - 1 : 1));
  s->catch_up_lag = opt.catch_up_lag ? opt.catch_up_lag : std::min<uint32_t>(2, s->lag);
  // A catch-up fetches a share of the predicted set (AutoCatchUpShare: an eighth per step of
  // its lag, a quarter every 2 steps by default).
  const double share =
      opt.catch_up_share > 0 ? opt.catch_up_share : AutoCatchUpShare(s->catch_up_lag);
  s->lag_pages = std::max<uint64_t>(
      1, static_cast<uint64_t>(std::ceil(std::min(1.0, share) * double(predict_budget) * pages)));
  {
    absl::MutexLock l(&mu);
    Impl& im = *this;
    if (im.admitted >= opt.max_sessions)
      return absl::ResourceExhaustedError(
          absl::StrCat("the worker holds its limit of ", opt.max_sessions, " sessions"));
    if (!im.arena) {
      im.payload_bytes = sp.PageBytes();
      im.cell_stride = RoundUp(kPageHeaderBytes + sp.PageBytes(), 64);
      im.num_cells = static_cast<uint32_t>(opt.reserve_bytes / im.cell_stride);
      if (im.num_cells == 0)
        return absl::ResourceExhaustedError(absl::StrCat(
            "a reserve of ", opt.reserve_bytes, " bytes holds no page of ", im.cell_stride));
      im.arena_bytes = size_t{im.num_cells} * im.cell_stride;
      im.arena = im.store->AllocateReserve(im.arena_bytes);
      im.store_arena = im.arena != nullptr;
      if (!im.arena) im.arena = kernels::AllocatePagePoolMemory(im.arena_bytes);
      if (!im.arena)
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot allocate a reserve of ", im.arena_bytes, " bytes"));
      im.free_cells.resize(im.num_cells);
      for (uint32_t c = 0; c < im.num_cells; ++c) im.free_cells[c] = im.num_cells - 1 - c;
    } else if (sp.PageBytes() != im.payload_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("this worker's reserve holds pages of ", im.payload_bytes,
                       " bytes; the spec's pages are ", sp.PageBytes()));
    }
    if (im.reserved_cells + cells > im.num_cells)
      return absl::ResourceExhaustedError(
          absl::StrCat("the reserve cannot admit session \"", id, "\": it needs ", cells,
                       " page cells (", ModeName(o.mode), ", ", o.max_tokens, " tokens), ",
                       im.num_cells - im.reserved_cells, " of ", im.num_cells, " are free"));
    im.reserved_cells += cells;
    ++im.admitted;
  }
  absl::MutexLock l(&s->mu);
  s->cell_of.assign(pages + 1, kNoCell);
  if (Checks(*s))
    s->check_bounds.reserve((pages + 1) * indexer::IndexerBoundsFloats(sp));
  s->keys.assign(sp.index_layers, {});
  s->hidden.assign(sp.hidden_dim, 0.0f);
  s->index_query.assign(size_t{sp.index_layers} * sp.q_heads * sp.head_dim, 0.0f);
  s->stats.reserved_cells = cells;
  if (o.mode == Mode::kTrace)
    s->trace = std::make_unique<TraceRecorder>(sp, s->tau, options.trace_labels);
  absl::Status st = EnsureOpenCell(*s);
  if (st.ok() && restore) st = RestoreState(s, *restore);
  if (!st.ok()) {  // a failed resume: nothing of it stays
    s->closed = true;
    s->WaitQuiet();
    Release(*s);
    return st;
  }
  absl::MutexLock rl(&mu);
  sessions[id] = s;
  return absl::OkStatus();
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

absl::Status DecodeCore::Impl::StepOne(const std::shared_ptr<Session>& sp, const LayerStep& r) {
  Session& s = *sp;
  const ModelSpec& spec = s.opt.spec;
  const uint32_t P = spec.page_tokens, d = spec.head_dim;
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
  const bool last = r.layer + 1 == spec.layers;
  const bool completes_chunk = (s.tokens + 1) % spec.chunk_tokens == 0;
  if (last && completes_chunk && r.index_keys.empty() && !(r.layer > 0 && s.have_step_keys))
    return absl::InvalidArgumentError(
        absl::StrCat("step ", r.step, " completes index chunk ", s.tokens / spec.chunk_tokens,
                     "; one of its layer requests must carry the chunk's index keys"));
  const bool seals = last && (s.tokens + 1) % P == 0;

  // From here on the request is valid.
  if (r.layer == 0) {
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
  }
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
  const uint64_t open = s.open_page();
  uint8_t* page = Payload(static_cast<uint32_t>(s.cell_of[open]));
  const uint32_t row = static_cast<uint32_t>(s.tokens % P);
  const size_t es = DTypeSize(spec.dtype);
  for (uint32_t h = 0; h < spec.kv_heads; ++h) {
    StoreFloats(spec.dtype, r.k.data() + size_t{h} * d,
                page + spec.ElemOffset(r.layer, 0, h, row) * es, d);
    StoreFloats(spec.dtype, r.v.data() + size_t{h} * d,
                page + spec.ElemOffset(r.layer, 1, h, row) * es, d);
  }
  if (seals) {
    // The page is complete once this layer's row is in: store it before anything changes,
    // so a store failure leaves the step retryable.
    if (absl::Status st = PutPage(s, open, page, P); !st.ok()) return st;
  }

  // The prediction of a cycle starts once its input is in.
  bool ready;  // lsa reads the hidden state, quest and model_query the index layers' queries
  switch (s.opt.policy) {
    case indexer::Policy::kDefault:
    case indexer::Policy::kLsa:
      ready = s.have_hidden || last;
      break;
    case indexer::Policy::kQuest:
    case indexer::Policy::kModelQuery:
      ready = r.layer >= indexer::ModelLayerOfIndexLayer(spec, spec.index_layers - 1);
      break;
    default:
      ready = true;
  }
  if (s.opt.mode == Mode::kSparse && r.step % s.tau == 0 && s.launched_for != r.step && !s.job &&
      ready) {
    Launch(sp);
    if (!s.have_set) {  // the session's first prediction: wait for it (warm-up)
      ++s.stats.warmup_waits;
      while (!s.job->done) s.job_cv.Wait(&s.mu);
      Install(sp, r.step);
    }
  }
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
    s.list_valid.back() = static_cast<uint16_t>(row + 1);
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
    if (absl::Status st = RecoverMisses(s, static_cast<uint32_t>(sync_layer), r.q.data(), lse,
                                        &fetched);
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
    s.trace->AddLayer(static_cast<uint32_t>(r.step), r.layer, r.q.data(), lse, pages, row + 1);
  }

  if (!last) return absl::OkStatus();
  // The step is complete.
  if (completes_chunk && s.opt.mode == Mode::kSparse) {
    const size_t kb = spec.IndexKeyBytes();
    for (uint32_t l = 0; l < spec.index_layers; ++l)
      s.keys[l].insert(s.keys[l].end(), s.step_keys.begin() + l * kb,
                       s.step_keys.begin() + (l + 1) * kb);
    KeepCheckKeys(s, s.step_keys.data(), 1, kb);
  }
  if (completes_chunk) ++s.key_chunks;
  if (s.trace) {
    if (completes_chunk) s.trace->AddKeys(s.step_keys.data(), 1);
    s.trace->EndStep(static_cast<uint32_t>(r.step));
  }
  ++s.tokens;
  ++s.next_step;
  s.next_layer = 0;
  ++s.stats.steps;
  ++totals.steps;
  s.stats.tokens = s.tokens;
  if (seals) {
    if (s.opt.mode == Mode::kSparse) {
      const size_t bf = indexer::IndexerBoundsFloats(spec);
      s.bounds.resize(s.bounds.size() + bf);
      PageBounds(s, page, P, s.bounds.data() + s.bounds.size() - bf);
      KeepCheckBounds(s, s.bounds.data() + s.bounds.size() - bf);
      s.bound_pages = open + 1;
    }
    s.plan_dirty = true;
    Trim(s);
    if (absl::Status st = EnsureOpenCell(s); !st.ok()) return st;
    // The state a resuming worker starts from; a store or indexer that is down only
    // delays it to the next seal.
    (void)SaveState(s);
  }
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

// ---- adapters ----

namespace {

class LocalStore : public PageStore {
 public:
  explicit LocalStore(fm::KvStore* s) : s_(s) {}
  absl::Status Put(const PageHeaderData& h, const uint8_t* payload) override {
    bool in_ram = false;
    return s_->Put(h, payload, h.payload_bytes, &in_ram);
  }
  absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                    size_t payload_bytes, const std::vector<uint8_t*>& dst) override {
    for (size_t i = 0; i < pages.size(); ++i) {
      absl::Status copied = absl::OkStatus();
      bool from_spill = false;
      absl::Status st = s_->Read(
          {session, pages[i]},
          [&](const uint8_t* rec, size_t len) {
            if (len != kPageHeaderBytes + payload_bytes)
              copied = absl::DataLossError(absl::StrCat("page ", pages[i], " of \"", session,
                                                        "\" has ", len, " record bytes"));
            else
              std::memcpy(dst[i], rec, len);
          },
          &from_spill);
      if (!st.ok()) return st;
      if (!copied.ok()) return copied;
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) override {
    std::string out;
    bool from_spill = false;
    absl::Status st = s_->Read(
        {session, page},
        [&](const uint8_t* rec, size_t len) {
          out.assign(reinterpret_cast<const char*>(rec) + kPageHeaderBytes, len - kPageHeaderBytes);
        },
        &from_spill);
    if (!st.ok()) return st;
    return out;
  }
  absl::Status CloseSession(const std::string& session, uint64_t epoch) override {
    return s_->CloseSession(session, epoch);
  }
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session) override {
    return s_->ClaimSession(session);
  }
  absl::Status DeleteSession(const std::string& session, uint64_t epoch) override {
    return s_->DeleteSession(session, epoch).status();
  }

 private:
  fm::KvStore* s_;
};

class LocalIndexer : public Predictor {
 public:
  explicit LocalIndexer(indexer::IndexerCore* c) : c_(c) {}
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds,
                        uint64_t bound_pages) override {
    return c_->Register(session, spec, keys, chunks, tokens, bounds, bound_pages);
  }
  absl::Status Append(const std::string& session, const ModelSpec&, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens, const float* bounds,
                      uint64_t first_page, uint64_t bound_pages) override {
    return c_->Append(session, keys, first_chunk, chunks, tokens, bounds, first_page, bound_pages);
  }
  absl::StatusOr<indexer::Prediction> Predict(const std::string& session,
                                              const indexer::PredictArgs& args) override {
    return c_->Predict(session, args);
  }
  absl::Status Drop(const std::string& session) override { return c_->Drop(session); }

 private:
  indexer::IndexerCore* c_;
};

}  // namespace

std::unique_ptr<PageStore> LocalPageStore(fm::KvStore* store) {
  return std::make_unique<LocalStore>(store);
}
std::unique_ptr<Predictor> LocalPredictor(indexer::IndexerCore* core) {
  return std::make_unique<LocalIndexer>(core);
}

}  // namespace fm::decode
