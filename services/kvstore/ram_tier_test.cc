#include "services/kvstore/ram_tier.h"

#include <gtest/gtest.h>

#include <vector>

namespace fm {
namespace {

class RamTierTest : public ::testing::Test {
 protected:
  // Room for exactly 4 records of 8000 bytes.
  std::vector<uint8_t> arena_ = std::vector<uint8_t>(32 << 10);
  RamTier tier_{arena_.data(), arena_.size(), 32 << 10};

  RamCell* Put(const std::string& key, std::vector<std::string>* evicted = nullptr) {
    RamCell* c = tier_.Allocate(8000, evicted);
    if (!c) return nullptr;
    bool replaced;
    tier_.Publish(c, key, &replaced);
    tier_.Unpin(c);
    return c;
  }
};

TEST_F(RamTierTest, EvictsLeastRecentlyUsed) {
  for (const char* k : {"a", "b", "c", "d"}) ASSERT_NE(Put(k), nullptr);
  EXPECT_EQ(tier_.pages(), 4u);
  ASSERT_NE(tier_.Find("a"), nullptr);  // a is now most recent; b is the oldest
  std::vector<std::string> evicted;
  ASSERT_NE(Put("e", &evicted), nullptr);
  EXPECT_EQ(evicted, std::vector<std::string>{"b"});
  EXPECT_EQ(tier_.Find("b"), nullptr);
  EXPECT_EQ(tier_.evictions(), 1u);
  EXPECT_EQ(tier_.used_bytes(), 4u * 8000);
}

TEST_F(RamTierTest, PinnedCellsAreNeverEvicted) {
  for (const char* k : {"a", "b", "c", "d"}) Put(k);
  for (const char* k : {"a", "b", "c", "d"}) tier_.Pin(tier_.Find(k));
  EXPECT_EQ(tier_.pinned_pages(), 4u);
  EXPECT_EQ(tier_.Allocate(8000, nullptr), nullptr);
  tier_.Unpin(tier_.Find("c"));
  std::vector<std::string> evicted;
  RamCell* c = tier_.Allocate(5000, &evicted);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(evicted, std::vector<std::string>{"c"});
  tier_.Unpin(c);  // unpublished: freed
  EXPECT_EQ(tier_.pages(), 3u);
}

TEST_F(RamTierTest, ReplacingAPinnedCellDetachesIt) {
  RamCell* old = Put("a");
  tier_.Pin(old);
  arena_[old->offset] = 7;
  RamCell* fresh = tier_.Allocate(8000, nullptr);
  bool replaced;
  tier_.Publish(fresh, "a", &replaced);
  tier_.Unpin(fresh);
  EXPECT_TRUE(replaced);
  EXPECT_EQ(tier_.Find("a"), fresh);
  EXPECT_EQ(arena_[old->offset], 7);  // the reader's copy is intact until it unpins
  EXPECT_EQ(tier_.pages(), 1u);
  // 4 cells: fresh + detached old + 2 free. After unpin the old one is free again.
  tier_.Unpin(old);
  for (const char* k : {"b", "c", "d"}) ASSERT_NE(Put(k), nullptr);
  EXPECT_EQ(tier_.evictions(), 0u);
}

TEST_F(RamTierTest, TooLargeAndEraseAndSizeClasses) {
  EXPECT_EQ(tier_.Allocate(64 << 10, nullptr), nullptr);
  Put("a");
  EXPECT_TRUE(tier_.Erase("a"));
  EXPECT_FALSE(tier_.Erase("a"));
  EXPECT_EQ(tier_.pages(), 0u);
  EXPECT_EQ(tier_.used_bytes(), 0u);
}

}  // namespace
}  // namespace fm

namespace fm {
namespace {

// Records of several sizes (a model's pages, another model's, decode states, index-key
// records) share the arena: it fills to 90 % of its bytes before the first eviction, and
// stays above that while LRU evictions make room (before: one 64 MiB slab per size class,
// 16 pages in 1 GiB).
TEST(RamTierMixedSizes, FillTheArenaBeforeAndWhileEvicting) {
  std::vector<uint8_t> arena(64 << 20);
  RamTier tier(arena.data(), arena.size(), 8 << 20);
  const std::vector<uint64_t> sizes = {2 << 20, 300 << 10, 36 << 10, 5000};
  std::vector<std::string> evicted;
  double fill_at_first_eviction = 0, min_fill_after = 1;
  bool replaced;
  for (int i = 0; i < 4000; ++i) {
    const uint64_t len = sizes[(i * 7 + i / 3) % sizes.size()];
    const uint64_t before = tier.used_bytes();
    RamCell* c = tier.Allocate(len, &evicted);
    ASSERT_NE(c, nullptr) << i;
    if (!evicted.empty() && fill_at_first_eviction == 0)
      fill_at_first_eviction = double(before) / tier.capacity_bytes();
    tier.Publish(c, "k" + std::to_string(i), &replaced);
    tier.Unpin(c);
    if (fill_at_first_eviction > 0)
      min_fill_after = std::min(min_fill_after, double(tier.used_bytes()) / tier.capacity_bytes());
  }
  std::printf("fill at the first eviction %.3f, lowest after %.3f\n", fill_at_first_eviction,
              min_fill_after);
  EXPECT_GE(fill_at_first_eviction, 0.9);
  EXPECT_GE(min_fill_after, 0.9);
}

// When the least recently used records are scattered between others, evicting them does
// not open an extent for a large record; the first window without a pinned record is then
// cleared. Pinned records are never evicted.
TEST(RamTierMixedSizes, AWindowIsClearedWhenScatteredEvictionsOpenNoExtent) {
  std::vector<uint8_t> arena(1 << 20);
  RamTier tier(arena.data(), arena.size(), 1 << 20);
  bool replaced;
  for (int i = 0; i < 256; ++i) {
    RamCell* c = tier.Allocate(4096, nullptr);
    ASSERT_NE(c, nullptr);
    tier.Publish(c, "k" + std::to_string(i), &replaced);
    tier.Unpin(c);
  }
  EXPECT_EQ(tier.free_bytes(), 0u);
  for (int i = 0; i < 256; ++i)  // every 4th record is now the least recently used
    if (i % 4 != 0) tier.Find("k" + std::to_string(i));
  tier.Pin(tier.Find("k2"));  // the first window of 200 KiB starts after it
  std::vector<std::string> evicted;
  RamCell* c = tier.Allocate(200 << 10, &evicted);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->offset, 3u * 4096);
  EXPECT_EQ(tier.Find("k2"), tier.Find("k2"));
  ASSERT_NE(tier.Find("k2"), nullptr);
  EXPECT_GT(evicted.size(), 64u);  // 64 scattered, then the window's
  tier.Unpin(c);
  // Everything pinned: nothing to free, nothing allocated.
  for (int i = 0; i < 256; ++i)
    if (RamCell* p = tier.Find("k" + std::to_string(i))) tier.Pin(p);
  EXPECT_EQ(tier.Allocate(512 << 10, nullptr), nullptr);
  EXPECT_EQ(tier.Allocate(2 << 20, nullptr), nullptr);  // larger than the arena
}

}  // namespace
}  // namespace fm
