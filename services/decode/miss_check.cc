// The per-step miss check (SessionOptions::miss_ratio, DecodeOptions::miss_check) and its
// recovery fetches.
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

void DecodeCore::Impl::PageBounds(const Session& s, const uint8_t* payload, uint32_t valid,
                                  float* out) const {
  const ModelSpec& sp = s.opt.spec;
  std::vector<float> all(kernels::QuestBoundsFloats(s.shape));
  kernels::QuestBounds(s.shape, payload, valid, all.data());
  const size_t per_layer = size_t{sp.kv_heads} * 2 * sp.head_dim;
  for (uint32_t l = 0; l < sp.index_layers; ++l)
    std::memcpy(out + l * per_layer,
                all.data() + indexer::ModelLayerOfIndexLayer(sp, l) * per_layer, per_layer * 4);
}

void DecodeCore::Impl::KeepCheckKeys(Session& s, const uint8_t* keys, uint64_t chunks,
                                     size_t layer_stride) {
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

const KeySketch* DecodeCore::Impl::SyncSketch(Session& s, uint32_t l) {
  if (options.miss_sketch_rank == 0 || l >= s.check_keys.size()) return nullptr;
  if (s.check_sketch.size() < s.check_keys.size())
    s.check_sketch.resize(s.check_keys.size(), KeySketch(options.miss_sketch_rank));
  s.check_sketch[l].Sync(s.opt.spec, s.check_keys[l]);
  return &s.check_sketch[l];
}

void DecodeCore::Impl::KeepCheckBounds(Session& s, const float* bounds) {
  if (!Checks(s)) return;
  s.check_bounds.insert(s.check_bounds.end(), bounds,
                        bounds + indexer::IndexerBoundsFloats(s.opt.spec));
}

std::vector<uint64_t> DecodeCore::Impl::MissCheck(
    const ModelSpec& sp, uint32_t l, const float* q, const float* lse,
    const std::vector<uint64_t>& pages, const float* bounds, double ratio, uint32_t max_pages,
    const std::vector<uint8_t>* keys, const KeySketch* sketch, uint64_t* exact) const {
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

void DecodeCore::Impl::LaunchCheck(const std::shared_ptr<Session>& sp, const float* q,
                                   const float* lse) {
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

void DecodeCore::Impl::PostCheck(const std::shared_ptr<Session>& sp,
                                 const std::shared_ptr<Session::Recovery>& rec, uint64_t cells) {
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

absl::Status DecodeCore::Impl::RecoverMisses(Session& s, uint32_t l, const float* q,
                                             const float* lse, bool* fetched) {
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
    if (s.closed) return absl::NotFoundError(absl::StrCat("session \"", s.id, "\" was closed"));
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

void DecodeCore::Impl::InstallRecovery(Session& s) {
  std::shared_ptr<Session::Recovery> rec = std::move(s.recovery);
  for (uint64_t p : Place(s, *rec)) {
    s.wanted.insert(std::upper_bound(s.wanted.begin(), s.wanted.end(), p), p);
    ++s.stats.surprise_fetches;
    ++totals.surprise_fetches;
  }
}

}  // namespace fm::decode
