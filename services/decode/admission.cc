// Admission and footprint planning: the cap turned into cells, the switch lag, the cycle;
// a session's set-up (and a resume's restore).
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

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

absl::Status DecodeCore::Impl::Create(const std::string& id, const SessionOptions& o,
                                      const flashmemory::v1::DecodeSessionState* restore,
                                      uint64_t epoch) {
  if (absl::Status st = o.spec.Validate(); !st.ok()) return st;
  const ModelSpec& sp = o.spec;
  if (sp.index_layers == 0 || sp.index_dim == 0)
    return absl::InvalidArgumentError("the spec has no index layers; the worker needs them");
  if (o.max_tokens == 0 || o.max_tokens > kMaxSessionTokens)
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be in [1, ", kMaxSessionTokens,
                                                   "] (it sizes the reservation), got ",
                                                   o.max_tokens));
  if (o.tau > kMaxTau)
    return absl::InvalidArgumentError(
        absl::StrCat("tau must be in [0, ", kMaxTau, "] (0 = the worker's), got ", o.tau));
  if (o.mode == Mode::kSparse && o.max_pages == 0 && !(o.budget > 0.0f && o.budget <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("budget must be in (0, 1], got ", o.budget));
  if (o.mode == Mode::kSparse && o.policy == indexer::Policy::kOracle && o.oracle_page_mass.empty())
    return absl::InvalidArgumentError(
        "policy oracle needs the future attention (oracle_page_mass): evaluation only");
  if (!o.oracle_page_mass.empty() &&
      o.oracle_page_mass.size() % o.spec.PagesForTokens(o.max_tokens) != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "oracle_page_mass has ", o.oracle_page_mass.size(), " values; expected steps x ",
        o.spec.PagesForTokens(o.max_tokens), " (the pages of max_tokens)"));
  if (const uint32_t tau = o.tau ? o.tau : options.tau;
      tau != 0 && o.switch_lag > std::max<uint32_t>(1, tau - 1))
    return absl::InvalidArgumentError(
        absl::StrCat("switch_lag must be below tau (", tau, "), got ", o.switch_lag));
  if (!(o.miss_ratio >= 0 && std::isfinite(o.miss_ratio)))
    return absl::InvalidArgumentError(
        absl::StrCat("miss_ratio must be a finite number >= 0 (0 = off), got ", o.miss_ratio));
  if (o.level2_topk > kernels::kMaxLevel2TopK)
    return absl::InvalidArgumentError(absl::StrCat(
        "level2_topk must be in [0, ", kernels::kMaxLevel2TopK, "], got ", o.level2_topk));
  if (o.level2_topk > 0 && o.mode == Mode::kTrace)
    return absl::InvalidArgumentError("trace mode records dense attention: level2_topk must be 0");
  const DecodeOptions& opt = options;
  if (!o.trace_name.empty() && (o.mode != Mode::kTrace || !IsPlainFileName(o.trace_name)))
    return absl::InvalidArgumentError(
        absl::StrCat("trace_path \"", o.trace_name,
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
        cap >= pages ? 0 : predicted - static_cast<uint64_t>(double(predicted) / (1.0 + headroom));
    // As a fraction of the most pages, so that a history still growing gets its share.
    predict_budget =
        static_cast<float>(double(std::max<uint64_t>(predicted, 1)) / pages * (1.0 - 1e-6));
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
  if (Checks(*s)) s->check_bounds.reserve((pages + 1) * indexer::IndexerBoundsFloats(sp));
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

}  // namespace fm::decode
