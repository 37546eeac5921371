// The RAM tier: a fixed arena (registered with UCX by the owner) holding page records.
//
// Each record takes one extent of the arena (its length rounded up to 64 bytes), carved from
// the free extents by best fit and given back (merged with its free neighbours) when the
// record goes, so records of any mix of sizes fill the arena: nothing is reserved per size.
// To make room the least recently used unpinned records are evicted, whatever their size,
// until an extent fits; when scattered evictions do not open one (up to 64 tries), the first
// window of the arena with no pinned record is cleared. Records larger than max_record_bytes
// are never cached in RAM. A cell is pinned while a lease, a reader or a writer holds it; a
// pinned cell is never evicted or moved. Replacing or erasing a pinned cell detaches it:
// readers holding it keep a consistent (old) record until they unpin, then it is freed.
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
  uint64_t cell_bytes = 0;  // the extent's length
  uint64_t record_len = 0;  // bytes in use (header + payload)
  std::string key;          // set once published
  uint32_t pins = 0;
  bool published = false;
  bool in_lru = false;
  std::list<RamCell*>::iterator lru_it;
};

class RamTier {
 public:
  // `base` must stay valid for the tier's lifetime; records above max_record_bytes are not
  // cached.
  RamTier(uint8_t* base, uint64_t bytes, uint64_t max_record_bytes = 64u << 20);

  uint8_t* Data(const RamCell* c) const { return base_ + c->offset; }
  uint8_t* base() const { return base_; }

  // The published cell for key (touching its LRU position), or null.
  RamCell* Find(const std::string& key);
  // An unpublished cell of at least record_len bytes, pinned once, or null when no extent
  // can be freed for it (pinned records in the way) or it is too large. Keys of evicted
  // pages go to *evicted.
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
  uint64_t free_bytes() const { return free_bytes_; }  // in free extents

 private:
  // Takes an extent of `len` bytes (best fit); false when none is that long.
  bool TakeExtent(uint64_t len, uint64_t* offset);
  void GiveExtent(uint64_t offset, uint64_t len);  // merges with free neighbours
  // Clears the first window of `len` bytes that holds no pinned cell; false if none.
  bool EvictWindow(uint64_t len, std::vector<std::string>* evicted);
  void Evict(RamCell* c, std::vector<std::string>* evicted);
  void Free(RamCell* c);
  void Unpublish(RamCell* c);

  uint8_t* base_;
  uint64_t bytes_;
  uint64_t max_record_;
  std::map<uint64_t, uint64_t> free_;                  // offset -> length
  std::multimap<uint64_t, uint64_t> free_by_len_;      // length -> offset
  uint64_t free_bytes_ = 0;
  std::map<uint64_t, RamCell*> cells_by_offset_;       // every cell holding an extent
  std::list<RamCell*> lru_;  // front = most recent; published, unpinned cells only
  std::vector<std::unique_ptr<RamCell>> cells_;
  std::vector<RamCell*> spare_;  // cell objects to reuse
  absl::flat_hash_map<std::string, RamCell*> index_;
  uint64_t used_bytes_ = 0;
  uint64_t pinned_published_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace fm
