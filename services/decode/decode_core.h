// The decode worker's core: a C++ library an inference engine can embed in its own process
// (the gRPC service wraps the same object). It owns the device reserve — a fixed pool of
// page cells shared by every session — keeps each session's resident pages in it, runs the
// paged attention over them, and every tau steps asks the indexer for the next resident
// set and fetches the missing pages from the kvstore off the step's critical path.
//
// A session's life: Open (spec, mode, budget, policy, the most tokens it will hold; the
// admission reserves its cells or answers RESOURCE_EXHAUSTED), Prefill (whole pages in
// order plus the index keys of their chunks; repeatable), Step (per (step, layer): the
// query and the new token's K and V in, the attention output out), Close.
//
// Steps. Layers of a step come in order 0..L-1; a request for layer 0 of the current step
// restarts it (a client whose stream broke mid-step resends the whole step). The token's
// K/V go into the open page; the attention covers the resident pages and the open page,
// the new token included. A step whose token completes an index chunk must carry that
// chunk's index keys ([Li][di + 4]) on one of its layer requests. When the open page fills
// it is sealed: written to the kvstore, its chunks' keys (and Quest bounds) appended to the
// indexer. The hidden state rides on a layer request at cycle starts (step % tau == 0).
//
// Cycles (sparse mode). At a cycle start the prediction job launches as soon as its input is
// in (the hidden state for lsa, the index layers' queries for quest, at once otherwise); it
// runs Predict, diffs the answer against the resident set and reads the missing pages into
// free cells of the session's reservation. The new set takes over at layer 0 of step
// start + switch_lag; a step that reaches that point before the fetch is done waits for it
// and counts as a stall. Until then the previous set serves (so a prediction is at most
// switch_lag steps stale). The first prediction of a session (no set yet) is waited for at
// once (warm-up, counted apart from stalls). The sink and the tail (the last `tail` sealed
// pages and the open page) are always resident.
//
// Thread-safety: every method may be called from any thread; steps of one session are
// serialised, different sessions run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model_spec.h"
#include "common/page_format.h"
#include "services/decode/trace_recorder.h"
#include "services/indexer/indexer_core.h"

namespace fm::decode {

// sparse: the indexer's resident set (the product); dense: the whole history resident (the
// baseline); trace: dense, and the worker writes the session's trace (index keys, hidden
// states, queries, golden labels; services/decode/trace_recorder.h) into its trace
// directory at close, to train an indexer for the deployment's own model.
enum class Mode : uint8_t { kSparse = 1, kDense = 2, kTrace = 3 };
const char* ModeName(Mode m);
absl::StatusOr<Mode> ParseMode(const std::string& name);

// Where sealed pages go and come back from (the kvstore, local or remote).
class PageStore {
 public:
  virtual ~PageStore() = default;
  virtual absl::Status Put(const PageHeaderData& header, const uint8_t* payload) = 0;
  // Reads the records (header + payload) of pages of one session into dst[i], each with room
  // for kPageHeaderBytes + payload_bytes, and verifies them (DATA_LOSS on a mismatch).
  virtual absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                            size_t payload_bytes, const std::vector<uint8_t*>& dst) = 0;
  // The payload of one page (any length): the session's saved decode state.
  virtual absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) = 0;
  // epoch: the worker's ownership epoch of the session (ClaimSession; Put carries it in
  // the header): a store whose session another worker claimed since refuses with ABORTED.
  virtual absl::Status DeleteSession(const std::string& session, uint64_t epoch) = 0;
  // Marks the session closed: the store deletes it after its TTL unless a worker writes to
  // it first (a resume does at once).
  virtual absl::Status CloseSession(const std::string& session, uint64_t epoch) {
    return absl::OkStatus();
  }
  // Makes this worker the session's owner (a fencing epoch kept with its pages); 0: the
  // store does not fence.
  virtual absl::StatusOr<uint64_t> ClaimSession(const std::string& session) { return 0; }
  // Memory for the worker's reserve, registered with the store's transport so that Read
  // lands pages in their cells in place (null: the worker allocates its own). Called at most
  // once; the store owns the memory and outlives the worker.
  virtual uint8_t* AllocateReserve(size_t bytes) { return nullptr; }
  // Pages Read landed in place in the reserve (no copy), for the worker's metrics.
  virtual uint64_t pages_read_in_place() const { return 0; }
};

// The kvstore page number under which a session's decode state is saved.
inline constexpr uint64_t kStatePage = uint64_t{1} << 62;
// The kvstore page number kKeysPage + p holds page p's index keys and Quest bounds
// ([index layer][chunk of the page][di + 4], then IndexerBoundsFloats fp32), from which the
// worker re-registers a session with an indexer that lost it.
inline constexpr uint64_t kKeysPage = uint64_t{1} << 61;
size_t KeysRecordBytes(const ModelSpec& spec);

// The indexer the worker asks (an in-process IndexerCore or a remote IndexerClient).
using Predictor = indexer::Indexer;

// The switch lag of a sparse session when neither it nor the worker sets one: the steps its
// prediction and fetch take. The prediction: twice the ratio of the indexer's scan work per
// history page (chunks x index layers x heads x dims) to a sparse step's attention work per
// history page (tokens x layers x query heads x head dim x 2 x the predicted share of the
// pages); the fetch: one step (a focus switch moves fewer bytes than a step reads). Between
// 2 and 8 steps. On the CPU backends: 2 for the bench spec at a 10 % cap, 8 for the long
// spec at 5 %.
uint32_t AutoSwitchLag(const ModelSpec& spec, double predicted_share);

// The cycle length of a session when neither it nor the worker sets one: the smallest power
// of two at least 2.5 times its switch lag, between 8 and 64 steps. The set predicted at a
// cycle start serves from `lag` steps later, so a cycle of 2.5 lags or more keeps the
// steps a stale set serves under 40 % of it, and a short cycle keeps the hidden state that
// predicts it fresh. On the CPU backends: 8 for the bench spec at a 10 % cap (lag 2), 32
// for the long spec at 5 % (lag 8).
uint32_t AutoCycle(uint32_t switch_lag);

// The default share of the predicted set one catch-up fetches: an eighth per step of its
// catch-up lag, the whole set from 8 steps on; a quarter at the default catch-up lag of 2.
// The bench spec: a fetch of 17-33 pages outlasted 2 steps on 2 cores. The long spec (pages
// 8x smaller): a quarter every 2 steps brings the most wanted pages of a new set 5 steps
// sooner than the whole set a switch lag (7) later, and the whole set as soon.
double AutoCatchUpShare(uint32_t catch_up_lag);

struct DecodeOptions {
  uint64_t reserve_bytes = uint64_t{1} << 30;  // the device reserve shared by all sessions
  uint32_t tau = 0;  // decode steps per cycle; 0 = per session from its switch lag (AutoCycle)
  uint32_t sink = 1, tail = 2;                 // always-resident pages (DESIGN §1)
  // Steps after a cycle start at which its resident set takes over; 0 = per session from
  // its spec's costs (AutoSwitchLag).
  uint32_t switch_lag = 0;
  // Share of a sparse session's predicted set freed at each cycle start (its least wanted
  // pages) for the pages fetched while the previous set still serves; what a prediction adds
  // beyond them comes in catch-ups after the switch, into the cells of the pages it drops.
  // Between a switch and the next cycle start the set holds those cells too, so it costs
  // little, and the most wanted new pages (needles first) serve from the switch instead of
  // a catch-up later: 0.05 vs none gave needles 10/12 vs 6/12 at 128K (mass recall 0.9927 vs
  // 0.9905) and at 512K (0.947 vs 0.9466), 7/12 vs 6/12 at 32K. When it came on top of the
  // set instead, it cost 32K 0.02 of mass recall and 512K 0.008.
  double headroom = 0.05;
  // Steps after a switch (or a catch-up) at which the next catch-up of the pages that did not
  // fit serves; 0 = the switch lag, at most 2.
  uint32_t catch_up_lag = 0;
  // Share of the predicted set one catch-up (or a prediction's own fetch before its switch)
  // fetches; <= 0: per session from its catch-up lag (AutoCatchUpShare).
  double catch_up_share = -1;
  uint32_t max_sessions = 1024;
  // The gRPC service's bound on the requests of one DecodeStream batch: a larger batch ends
  // its stream with RESOURCE_EXHAUSTED before any of it runs (a flood of one stream must
  // not hold the worker's threads).
  uint32_t max_batch_requests = 4096;
  // A prediction's indexer calls and fetches that fail with UNAVAILABLE (a kvstore or
  // indexer restarting) are retried for this long before the cycle loses its prediction;
  // the cycle's switch step waits for them. 0 = no retry.
  uint32_t peer_retry_ms = 5000;
  // The gRPC service's refusal throttle (common/throttle.h): the bytes of DecodeStream
  // requests refused for the client's fault (unknown sessions, malformed requests) beyond
  // this rate, all streams together, with a one-second burst, get their answers late.
  // Receiving a request costs the worker by its bytes whether it is served or not. 0 = off.
  double refused_bytes_per_s = 8 << 20;
  uint32_t threads = 0;  // attention threads; 0 = the kernel pool's default
  // Miss recovery between predictions: at every step the last index layer's query is
  // checked against the Quest bounds of the pages that are not resident; a page whose bound
  // says it could carry more than miss_ratio times the resident attention mass is fetched
  // at once and serves from miss_lag steps later until the next cycle's set takes over.
  // Off by default: on 2 CPU cores the check costs about as much as a sparse step (see
  // README).
  bool miss_check = false;
  double miss_ratio = 1.0;
  uint32_t miss_max_pages = 4;  // pages fetched per check
  uint32_t miss_lag = 2;
  // The fewest cells a budget share gives a sparse session with its own miss check
  // (SessionOptions::miss_ratio), up to all its pages (an explicit max_pages is kept). The cap is a share of the history:
  // at 16K tokens 5 % is 13 cells, of which sink, tail, open page, sealing and miss pages
  // take 10; the 3 left cannot hold the pages one step reads, so the check evicts what the
  // next step needs (on the zoo's single1 at 16K, vartrack fell from 0.80 to 0.20 with the
  // check). The floor costs a short session a few pages (32 cells = 2K tokens of the zoo's
  // pages) and a long one nothing.
  uint32_t min_session_cells = 32;
  // The rank of the key sketch that bounds a page's mass before the session's own miss
  // check scores it exactly (services/decode/miss_sketch.h); 0 = every page the Quest box
  // does not rule out is scored exactly (about 10x the cost on the zoo's models at 64K).
  uint32_t miss_sketch_rank = 8;
  // Trace mode: where traces go (empty: the worker refuses trace sessions) and how their
  // golden labels are drawn.
  std::string trace_dir;
  TraceLabelOptions trace_labels;
};

struct SessionOptions {
  ModelSpec spec;
  Mode mode = Mode::kSparse;
  // The footprint cap: the most of the session's pages (of max_tokens) its reservation
  // holds, everything included — sink, tail, open page and the predicted set, which frees
  // a headroom at each cycle start for pages fetched while it still serves
  // (DecodeOptions::headroom). The indexer is asked for cap - 3 - miss pages. A cap
  // below what sink + tail need is raised to that minimum.
  float budget = 0.1f;
  uint32_t max_pages = 0;  // the cap in pages instead (0 = use budget)
  indexer::Policy policy = indexer::Policy::kDefault;
  uint64_t max_tokens = 0;  // the most tokens the session will hold: sizes its reservation
  uint32_t tau = 0;         // decode steps per cycle; 0 = the worker's (or AutoCycle)
  uint32_t switch_lag = 0;  // steps after a cycle start before its set serves (< tau); 0 = the
                            // worker's
  // Level 2: each layer attends only to the top-k tokens of the resident set (scored per KV
  // head group by max_h q_h . k); 0 = off, else 1..2048. Not in trace mode.
  uint32_t level2_topk = 0;
  // Trace mode: the trace's file name in the worker's trace directory (a plain name,
  // [A-Za-z0-9._-]); empty = TraceFileName(session).
  std::string trace_name;
  // The session's own miss check, synchronous: at every index layer of every step, the
  // query's Quest bounds over the pages that are not resident are compared with its
  // attention over the resident ones; a page whose bound exceeds that log-sum-exp by
  // log(miss_ratio) in some head (at most DecodeOptions::miss_max_pages a check, highest
  // first) is read before the layer answers and its attention runs again with it: a miss
  // costs a stall, not a wrong answer. The pages serve until the next cycle's set takes
  // over. 0 = off (the worker's asynchronous check, DecodeOptions::miss_check, if on).
  float miss_ratio = 0;
  // Policy oracle (evaluation only): the true attention mass of each page at each decode
  // step to come, [step][PagesForTokens(max_tokens)]: a prediction ranks the pages by their
  // mass over the steps its set will serve (from its switch, tau steps). Not kept for a
  // resume.
  std::vector<float> oracle_page_mass;
  // Resume a session another worker served (or this one closed) from its state in the
  // kvstore and the indexer; every other field but spec (checked when given) comes from it.
  bool resume = false;
};

struct SessionStats {
  uint64_t tokens = 0, steps = 0;
  uint64_t next_step = 0;     // the step the session expects
  uint64_t stalls = 0;        // steps that waited for a fetch
  double stall_ms = 0;        // the time they waited, in all
  // Of the stalls, steps that waited for a catch-up (pages of a set that changed by more
  // than the fetch headroom, as after a focus switch) rather than for their cycle's switch.
  uint64_t catch_up_stalls = 0;
  uint64_t warmup_waits = 0;  // first predictions waited for
  uint64_t predictions = 0, prediction_failures = 0, fetched_pages = 0, deferred_pages = 0;
  uint64_t surprise_fetches = 0;  // pages fetched by the per-step miss check
  // The session's own miss check (SessionOptions::miss_ratio): (step, layer) checks run, and
  // those that flagged pages (each a stall).
  uint64_t miss_checks = 0, miss_fires = 0;
  uint64_t miss_exact_pages = 0;  // pages it scored from their keys (neither bound ruled out)
  uint64_t miss_evictions = 0;  // pages of the set it evicted to make room
  uint64_t reregistrations = 0;   // times the indexer had lost the session and got it again
  bool fetching = false;          // a prediction or catch-up is in flight
  uint32_t tau = 0, switch_lag = 0;
  uint64_t resident_pages = 0, peak_resident_pages = 0, reserved_cells = 0;
  uint64_t total_pages = 0;
  double footprint = 0;  // peak resident pages / pages of the full history
};

// The worker's reserve now, and totals over every session since it started.
struct ReserveStats {
  uint64_t cells = 0, cell_bytes = 0, reserved_cells = 0, used_cells = 0, sessions = 0;
  uint64_t steps = 0, stalls = 0, catch_up_stalls = 0, predictions = 0, prediction_failures = 0,
           fetched_pages = 0, surprise_fetches = 0, reregistrations = 0;
  uint64_t peer_retries = 0;  // prediction calls and fetches retried while a peer was down
  uint64_t stall_us = 0;  // the time stalled steps waited
};

// One (session, step, layer) request. Spans point into the caller's memory for the call.
struct LayerStep {
  std::string session;
  uint64_t step = 0;
  uint32_t layer = 0;
  absl::Span<const float> q;             // [q_heads][head_dim]
  absl::Span<const float> k, v;          // [kv_heads][head_dim]: the new token
  absl::Span<const float> hidden;        // [hidden_dim], at cycle starts (any layer)
  absl::Span<const uint8_t> index_keys;  // [index_layers][di + 4] of the chunk completed
  float* out = nullptr;                  // [q_heads][head_dim]
  float* lse = nullptr;                  // [q_heads] log-sum-exp, optional
  bool* stalled = nullptr;               // set when the step waited for a fetch, optional
};

class DecodeCore {
 public:
  // store and predictor must outlive the core.
  DecodeCore(const DecodeOptions& options, PageStore* store, Predictor* predictor);
  ~DecodeCore();
  DecodeCore(const DecodeCore&) = delete;
  DecodeCore& operator=(const DecodeCore&) = delete;

  // INVALID_ARGUMENT: bad spec or options, a page size other than the reserve's;
  // ALREADY_EXISTS: the id is open; RESOURCE_EXHAUSTED: the reservation does not fit.
  absl::Status Open(const std::string& session, const SessionOptions& options);
  // Appends `n_pages` pages ([n][PageBytes]) to the history; `tokens` is the history length
  // after them (only the last page may be partial, and only in the last Prefill call); index
  // keys [index_layer][chunks][di + 4] of the complete chunks from `first_chunk` on.
  absl::Status Prefill(const std::string& session, const uint8_t* pages, uint64_t n_pages,
                       uint64_t tokens, const uint8_t* index_keys, uint64_t first_chunk,
                       uint64_t chunks);
  // Runs a batch of layer requests (any sessions; a session's in order). One status per
  // request; a bad request leaves its session as it was.
  std::vector<absl::Status> Step(absl::Span<const LayerStep> batch);
  // Releases the session's cells. Its history stays in the kvstore and the indexer (the open
  // page is written out) so that any worker can reopen it, unless drop_history. A trace
  // session writes its trace (whole cycles) to <trace_dir>/TraceFileName(session); a trace
  // session cannot be resumed elsewhere.
  absl::Status Close(const std::string& session, bool drop_history = false);
  // save = false: release the cells only (a failed resume).
  absl::Status Close(const std::string& session, bool drop_history, bool save);
  absl::StatusOr<SessionStats> Stats(const std::string& session) const;
  absl::StatusOr<ModelSpec> SessionSpec(const std::string& session) const;
  // Whether each page is resident in the reserve now (evaluation: needle hits).
  absl::StatusOr<std::vector<bool>> Resident(const std::string& session,
                                             const std::vector<uint64_t>& pages) const;
  ReserveStats Reserve() const;

  // The page payload bytes the reserve's cells hold (0 until the first Open).
  uint64_t cell_payload_bytes() const;
  const DecodeOptions& options() const;

 private:
  struct Session;
  struct Impl;
  absl::Status OpenClaimed(const std::string& session, const SessionOptions& options);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fm::decode
