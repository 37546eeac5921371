#include "services/kvstore/ram_tier.h"

#include <algorithm>

namespace fm {
namespace {
// Records start on cache lines: any mix of sizes packs the arena within 64 bytes each.
constexpr uint64_t kCellAlign = 64;
constexpr int kLruTries = 64;  // LRU evictions per allocation before a window is cleared
}  // namespace

RamTier::RamTier(uint8_t* base, uint64_t bytes, uint64_t max_record_bytes)
    : base_(base),
      bytes_(bytes / kCellAlign * kCellAlign),
      max_record_(std::max<uint64_t>(max_record_bytes, kCellAlign)) {
  if (bytes_ > 0) GiveExtent(0, bytes_);
}

RamCell* RamTier::Find(const std::string& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return nullptr;
  RamCell* c = it->second;
  if (c->in_lru) lru_.splice(lru_.begin(), lru_, c->lru_it);
  return c;
}

bool RamTier::TakeExtent(uint64_t len, uint64_t* offset) {
  auto it = free_by_len_.lower_bound(len);
  if (it == free_by_len_.end()) return false;
  const uint64_t off = it->second, have = it->first;
  free_by_len_.erase(it);
  free_.erase(off);
  free_bytes_ -= have;
  if (have > len) {
    free_[off + len] = have - len;
    free_by_len_.emplace(have - len, off + len);
    free_bytes_ += have - len;
  }
  *offset = off;
  return true;
}

void RamTier::GiveExtent(uint64_t offset, uint64_t len) {
  auto erase_by_len = [&](uint64_t off, uint64_t l) {
    auto [a, b] = free_by_len_.equal_range(l);
    for (auto i = a; i != b; ++i)
      if (i->second == off) {
        free_by_len_.erase(i);
        return;
      }
  };
  free_bytes_ += len;
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == offset + len) {  // merge the following extent
    erase_by_len(next->first, next->second);
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {  // merge the preceding extent
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      erase_by_len(prev->first, prev->second);
      offset = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  free_[offset] = len;
  free_by_len_.emplace(len, offset);
}

void RamTier::Evict(RamCell* c, std::vector<std::string>* evicted) {
  if (evicted) evicted->push_back(c->key);
  ++evictions_;
  Unpublish(c);  // unpinned: its extent goes back
}

bool RamTier::EvictWindow(uint64_t len, std::vector<std::string>* evicted) {
  // Walk the arena in offset order; `start` is where the current run without pinned cells
  // began. The first run of len bytes is cleared.
  uint64_t start = 0;
  for (auto it = cells_by_offset_.begin();; ++it) {
    const uint64_t at = it == cells_by_offset_.end() ? bytes_ : it->first;
    if (at >= start + len) break;  // [start, start + len) holds no pinned cell
    if (it == cells_by_offset_.end()) return false;
    RamCell* c = it->second;
    if (c->pins > 0 || !c->published) start = c->offset + c->cell_bytes;
  }
  std::vector<RamCell*> victims;
  for (auto it = cells_by_offset_.lower_bound(start);
       it != cells_by_offset_.end() && it->first < start + len; ++it)
    victims.push_back(it->second);
  for (RamCell* c : victims) Evict(c, evicted);
  return true;
}

RamCell* RamTier::Allocate(uint64_t record_len, std::vector<std::string>* evicted) {
  const uint64_t need = (record_len + kCellAlign - 1) / kCellAlign * kCellAlign;
  if (need > max_record_ || need > bytes_) return nullptr;
  uint64_t offset = 0;
  for (int tries = 0; !TakeExtent(need, &offset); ++tries) {
    if (tries < kLruTries && !lru_.empty()) {
      Evict(lru_.back(), evicted);
    } else if (tries > kLruTries + 1 || !EvictWindow(need, evicted)) {
      return nullptr;
    }
  }
  RamCell* c;
  if (!spare_.empty()) {
    c = spare_.back();
    spare_.pop_back();
  } else {
    cells_.push_back(std::make_unique<RamCell>());
    c = cells_.back().get();
  }
  *c = RamCell{};
  c->offset = offset;
  c->cell_bytes = need;
  c->record_len = record_len;
  c->pins = 1;
  cells_by_offset_[offset] = c;
  return c;
}

void RamTier::Publish(RamCell* cell, const std::string& key, bool* replaced) {
  *replaced = false;
  auto it = index_.find(key);
  if (it != index_.end()) {
    *replaced = true;
    Unpublish(it->second);
  }
  cell->key = key;
  cell->published = true;
  index_[key] = cell;
  used_bytes_ += cell->record_len;
  if (cell->pins > 0) {
    ++pinned_published_;
  } else {
    lru_.push_front(cell);
    cell->lru_it = lru_.begin();
    cell->in_lru = true;
  }
}

void RamTier::Pin(RamCell* c) {
  if (c->pins++ == 0 && c->published) {
    ++pinned_published_;
    if (c->in_lru) {
      lru_.erase(c->lru_it);
      c->in_lru = false;
    }
  }
}

void RamTier::Unpin(RamCell* c) {
  if (c->pins == 0) return;
  if (--c->pins > 0) return;
  if (!c->published) {
    Free(c);
    return;
  }
  --pinned_published_;
  lru_.push_front(c);
  c->lru_it = lru_.begin();
  c->in_lru = true;
}

bool RamTier::Erase(const std::string& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return false;
  Unpublish(it->second);
  return true;
}

void RamTier::Unpublish(RamCell* c) {
  index_.erase(c->key);
  used_bytes_ -= c->record_len;
  c->published = false;
  if (c->in_lru) {
    lru_.erase(c->lru_it);
    c->in_lru = false;
  }
  if (c->pins == 0) {
    Free(c);
  } else {
    --pinned_published_;  // detached: freed by its last Unpin
  }
}

void RamTier::Free(RamCell* c) {
  cells_by_offset_.erase(c->offset);
  GiveExtent(c->offset, c->cell_bytes);
  c->key.clear();
  c->record_len = 0;
  c->cell_bytes = 0;
  spare_.push_back(c);
}

}  // namespace fm
