#include "services/kvstore/ram_tier.h"

#include <algorithm>

namespace fm {
namespace {
constexpr uint64_t kCellAlign = 4096;
}

RamTier::RamTier(uint8_t* base, uint64_t bytes, uint64_t slab_bytes)
    : base_(base),
      bytes_(bytes),
      slab_bytes_(std::max<uint64_t>(slab_bytes / kCellAlign * kCellAlign, kCellAlign)) {
  for (uint64_t off = 0; off + kCellAlign <= bytes_; off += slab_bytes_) {
    Slab s;
    s.offset = off;
    s.bytes = std::min(slab_bytes_, (bytes_ - off) / kCellAlign * kCellAlign);
    slabs_.push_back(s);
  }
  for (uint32_t i = slabs_.size(); i-- > 0;) uncarved_.push_back(i);
}

RamCell* RamTier::Find(const std::string& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return nullptr;
  RamCell* c = it->second;
  if (c->in_lru) {
    auto& lru = classes_[c->cell_bytes].lru;
    lru.splice(lru.begin(), lru, c->lru_it);
  }
  return c;
}

void RamTier::Carve(uint32_t slab, uint64_t cell_bytes, SizeClass* cls) {
  Slab& s = slabs_[slab];
  s.cell_bytes = cell_bytes;
  uint64_t n = s.bytes / cell_bytes;
  // Reuse the cell objects the slab had before, then make new ones.
  for (uint64_t i = 0; i < n; ++i) {
    RamCell* c;
    if (i < s.cells.size()) {
      c = s.cells[i];
    } else {
      cells_.push_back(std::make_unique<RamCell>());
      c = cells_.back().get();
      s.cells.push_back(c);
    }
    *c = RamCell{};
    c->offset = s.offset + i * cell_bytes;
    c->slab = slab;
    c->cell_bytes = cell_bytes;
    cls->free.push_back(c);
  }
  s.cells.resize(n);  // surplus cell objects (from a class of smaller cells) stay unused
}

int RamTier::StealSlab(uint64_t cell_bytes, std::vector<std::string>* evicted) {
  for (size_t tried = 0; tried < slabs_.size(); ++tried) {
    uint32_t i = steal_cursor_++ % slabs_.size();
    Slab& s = slabs_[i];
    if (s.cell_bytes == 0 || s.cell_bytes == cell_bytes || s.bytes < cell_bytes) continue;
    bool pinned = false;
    for (RamCell* c : s.cells) pinned |= c->pins > 0;
    if (pinned) continue;
    SizeClass& old = classes_[s.cell_bytes];
    for (RamCell* c : s.cells) {
      if (c->published) {
        if (evicted) evicted->push_back(c->key);
        ++evictions_;
        Unpublish(c);  // unpinned: back on the old class's free list
      }
    }
    old.free.erase(
        std::remove_if(old.free.begin(), old.free.end(), [i](RamCell* c) { return c->slab == i; }),
        old.free.end());
    return static_cast<int>(i);
  }
  return -1;
}

RamCell* RamTier::Allocate(uint64_t record_len, std::vector<std::string>* evicted) {
  uint64_t cell_bytes = (record_len + kCellAlign - 1) / kCellAlign * kCellAlign;
  if (cell_bytes > slab_bytes_) return nullptr;
  SizeClass& cls = classes_[cell_bytes];
  if (cls.free.empty()) {
    auto fit = std::find_if(uncarved_.rbegin(), uncarved_.rend(),
                            [&](uint32_t i) { return slabs_[i].bytes >= cell_bytes; });
    if (fit != uncarved_.rend()) {
      uint32_t slab = *fit;
      uncarved_.erase(std::next(fit).base());
      Carve(slab, cell_bytes, &cls);
    } else if (!cls.lru.empty()) {
      RamCell* victim = cls.lru.back();
      if (evicted) evicted->push_back(victim->key);
      ++evictions_;
      Unpublish(victim);  // unpinned: goes to the free list
    } else {
      int slab = StealSlab(cell_bytes, evicted);
      if (slab < 0) return nullptr;
      Carve(static_cast<uint32_t>(slab), cell_bytes, &cls);
    }
  }
  if (cls.free.empty()) return nullptr;
  RamCell* c = cls.free.back();
  cls.free.pop_back();
  c->record_len = record_len;
  c->pins = 1;
  c->published = false;
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
    auto& lru = classes_[cell->cell_bytes].lru;
    lru.push_front(cell);
    cell->lru_it = lru.begin();
    cell->in_lru = true;
  }
}

void RamTier::Pin(RamCell* c) {
  if (c->pins++ == 0 && c->published) {
    ++pinned_published_;
    if (c->in_lru) {
      classes_[c->cell_bytes].lru.erase(c->lru_it);
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
  auto& lru = classes_[c->cell_bytes].lru;
  lru.push_front(c);
  c->lru_it = lru.begin();
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
    classes_[c->cell_bytes].lru.erase(c->lru_it);
    c->in_lru = false;
  }
  if (c->pins == 0) {
    Free(c);
  } else {
    --pinned_published_;  // detached: freed by its last Unpin
  }
}

void RamTier::Free(RamCell* c) {
  c->key.clear();
  c->record_len = 0;
  classes_[c->cell_bytes].free.push_back(c);
}

}  // namespace fm
