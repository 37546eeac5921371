// The RAM tier: a fixed arena (registered with UCX by the owner) carved into page cells.
//
// The arena is split into equal slabs; a slab is carved into cells of one size class
// (record length rounded up to 4 KiB) when a class first needs it. To make room a class
// evicts its own least recently used unpinned cell, and when it has none it takes over a
// slab of another class that holds no pinned cell (evicting that slab's pages). Records
// larger than a slab are never cached in RAM. A cell is pinned while a lease, a reader or a writer
// holds it; a pinned cell is never evicted or reused. Replacing or erasing a pinned cell detaches
// it: readers holding it keep a consistent (old) record until they unpin, then it is freed.
//
// Not thread-safe: the owner serialises every call.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace fm {

struct RamCell {
  uint64_t offset = 0;      // from the arena base
  uint32_t slab = 0;        // index of the owning slab
  uint64_t cell_bytes = 0;  // size class
  uint64_t record_len = 0;  // bytes in use (header + payload)
  std::string key;          // set once published
  uint32_t pins = 0;
  bool published = false;
  bool in_lru = false;
  std::list<RamCell*>::iterator lru_it;
};

class RamTier {
 public:
  // `base` must stay valid for the tier's lifetime; `slab_bytes` is the carving unit.
  RamTier(uint8_t* base, uint64_t bytes, uint64_t slab_bytes = 64u << 20);

  uint8_t* Data(const RamCell* c) const { return base_ + c->offset; }
  uint8_t* base() const { return base_; }

  // The published cell for key (touching its LRU position), or null.
  RamCell* Find(const std::string& key);
  // An unpublished cell of at least record_len bytes, pinned once, or null when every cell
  // of the class is pinned and no slab is left. Keys of evicted pages go to *evicted.
  RamCell* Allocate(uint64_t record_len, std::vector<std::string>* evicted);
  // Makes `cell` (allocated, filled) the record of `key`. An older cell of the key is
  // detached (its key is returned in *replaced when it was published).
  void Publish(RamCell* cell, const std::string& key, bool* replaced);
  void Pin(RamCell* c);
  // Drops one pin. An unpublished cell with no pins left is freed.
  void Unpin(RamCell* c);
  // Unpublishes key; returns whether it was present.
  bool Erase(const std::string& key);

  uint64_t capacity_bytes() const { return bytes_; }
  uint64_t used_bytes() const { return used_bytes_; }  // record bytes of published cells
  uint64_t pages() const { return index_.size(); }
  uint64_t pinned_pages() const { return pinned_published_; }
  uint64_t evictions() const { return evictions_; }

 private:
  struct SizeClass {
    std::vector<RamCell*> free;
    std::list<RamCell*> lru;  // front = most recent; published, unpinned cells only
  };
  struct Slab {
    uint64_t offset = 0, bytes = 0;
    uint64_t cell_bytes = 0;  // 0 = not carved yet
    std::vector<RamCell*> cells;
  };
  void Carve(uint32_t slab, uint64_t cell_bytes, SizeClass* cls);
  // Evicts every page of a slab of another class that has no pinned cell; its index or -1.
  int StealSlab(uint64_t cell_bytes, std::vector<std::string>* evicted);
  void Free(RamCell* c);
  void Unpublish(RamCell* c);

  uint8_t* base_;
  uint64_t bytes_;
  uint64_t slab_bytes_;
  std::vector<Slab> slabs_;
  std::vector<uint32_t> uncarved_;  // slab indices not yet given to a class
  uint32_t steal_cursor_ = 0;
  std::map<uint64_t, SizeClass> classes_;
  std::vector<std::unique_ptr<RamCell>> cells_;
  absl::flat_hash_map<std::string, RamCell*> index_;
  uint64_t used_bytes_ = 0;
  uint64_t pinned_published_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace fm
