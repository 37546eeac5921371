#include "services/kvstore/ram_tier.h"

#include <gtest/gtest.h>

#include <vector>

namespace fm {
namespace {

class RamTierTest : public ::testing::Test {
 protected:
  // Room for exactly 4 cells of 8 KiB.
  std::vector<uint8_t> arena_ = std::vector<uint8_t>(32 << 10);
  RamTier tier_{arena_.data(), arena_.size(), 32 << 10};

  RamCell* Put(const std::string& key, std::vector<std::string>* evicted = nullptr) {
    RamCell* c = tier_.Allocate(5000, evicted);
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
  EXPECT_EQ(tier_.used_bytes(), 4u * 5000);
}

TEST_F(RamTierTest, PinnedCellsAreNeverEvicted) {
  for (const char* k : {"a", "b", "c", "d"}) Put(k);
  for (const char* k : {"a", "b", "c", "d"}) tier_.Pin(tier_.Find(k));
  EXPECT_EQ(tier_.pinned_pages(), 4u);
  EXPECT_EQ(tier_.Allocate(5000, nullptr), nullptr);
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
  RamCell* fresh = tier_.Allocate(5000, nullptr);
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

TEST(RamTierSlabs, AClassWithoutRoomTakesAnUnpinnedSlabOfAnother) {
  std::vector<uint8_t> arena(64 << 10);
  RamTier tier(arena.data(), arena.size(), 32 << 10);  // two slabs
  bool replaced;
  // Class 8 KiB takes slab 0, class 16 KiB takes slab 1.
  for (int i = 0; i < 4; ++i) {
    RamCell* c = tier.Allocate(8 << 10, nullptr);
    ASSERT_NE(c, nullptr);
    tier.Publish(c, "s" + std::to_string(i), &replaced);
    tier.Unpin(c);
  }
  RamCell* big = tier.Allocate(16 << 10, nullptr);
  tier.Publish(big, "big0", &replaced);
  tier.Unpin(big);
  tier.Pin(tier.Find("big0"));  // slab 1 is pinned
  big = tier.Allocate(16 << 10, nullptr);
  tier.Publish(big, "big1", &replaced);
  tier.Unpin(big);
  // A third record of the 16 KiB class: its class has no unpinned cell, so it takes slab 0.
  std::vector<std::string> evicted;
  RamCell* c = tier.Allocate((16 << 10) - 100, &evicted);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(evicted, std::vector<std::string>{"big1"});  // within-class LRU comes first
  tier.Unpin(c);
  evicted.clear();
  tier.Pin(tier.Find("s0"));
  c = tier.Allocate(24 << 10, &evicted);
  EXPECT_EQ(c, nullptr);  // 24 KiB class: slab 0 is pinned by s0, slab 1 by big0
  tier.Unpin(tier.Find("s0"));
  c = tier.Allocate(24 << 10, &evicted);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(evicted.size(), 4u);                         // every 8 KiB page of slab 0
  EXPECT_EQ(tier.pages(), 1u);                           // big0 is all that is left
  EXPECT_EQ(tier.Allocate(40 << 10, nullptr), nullptr);  // larger than a slab
}

}  // namespace
}  // namespace fm
