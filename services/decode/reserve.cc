// The cell reserve: a session's cells, eviction, and the attention plan over them.
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

absl::Status DecodeCore::Impl::Claim(const std::string& id) {
  absl::MutexLock l(&mu);
  if (sessions.count(id))
    return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" is already open"));
  if (!pending.insert(id).second)
    return absl::UnavailableError(
        absl::StrCat("session \"", id, "\" is being opened or closed by another call; retry"));
  return absl::OkStatus();
}

void DecodeCore::Impl::Unclaim(const std::string& id) {
  absl::MutexLock l(&mu);
  pending.erase(id);
}

std::shared_ptr<DecodeCore::Session> DecodeCore::Impl::Find(const std::string& id) const {
  absl::ReaderMutexLock l(&mu);
  auto it = sessions.find(id);
  return it == sessions.end() ? nullptr : it->second;
}

absl::StatusOr<uint32_t> DecodeCore::Impl::TakeCell(Session& s) {
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

void DecodeCore::Impl::GiveCell(Session& s, uint32_t c) {
  absl::MutexLock l(&mu);
  free_cells.push_back(c);
  --s.in_use;
}

void DecodeCore::Impl::Evict(Session& s, uint64_t page) {
  if (page < s.cell_of.size() && s.cell_of[page] != kNoCell) {
    GiveCell(s, static_cast<uint32_t>(s.cell_of[page]));
    s.cell_of[page] = kNoCell;
    s.plan_dirty = true;
  }
}

void DecodeCore::Impl::EvictFromSet(Session& s, uint64_t page) {
  Evict(s, page);
  auto w = std::lower_bound(s.wanted.begin(), s.wanted.end(), page);
  if (w != s.wanted.end() && *w == page) s.wanted.erase(w);
}

std::vector<uint64_t> DecodeCore::Impl::ResidentPages(const Session& s) const {
  std::vector<uint64_t> out;
  for (uint64_t p = 0; p < s.sealed(); ++p)
    if (s.cell_of[p] != kNoCell) out.push_back(p);
  return out;
}

void DecodeCore::Impl::Trim(Session& s) {
  if (s.opt.mode != Mode::kSparse) return;
  const uint64_t sealed = s.sealed();
  for (uint64_t p = 0; p < sealed && p < s.cell_of.size(); ++p)
    if (s.cell_of[p] != kNoCell && !Pinned(s, p) && !Wanted(s, p)) Evict(s, p);
}

absl::Status DecodeCore::Impl::EnsureOpenCell(Session& s) {
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

uint64_t DecodeCore::Impl::ReadyPages(const Session& s) const {
  return std::min({s.key_chunks / s.opt.spec.ChunksPerPage(), s.bound_pages, s.sealed()});
}

uint64_t DecodeCore::Impl::KeepFree(const Session& s) const {
  return 2 + (Checks(s) ? options.miss_max_pages : 0);
}

absl::Status DecodeCore::Impl::RebuildPlan(Session& s) {
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

}  // namespace fm::decode
