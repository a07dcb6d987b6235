#include "server/engine/block_table_arena.h"

#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace blocksel {
namespace {

TEST(BlockTableArenaTest, ATableStaysInPlaceUntilItOutgrowsItsSegment) {
  BlockTableArena arena(1024);
  std::optional<BlockTableArena::Placement> first = arena.Place(3, 5);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->resident, 0);
  arena.MarkResident(3, 5);
  std::optional<BlockTableArena::Placement> again = arena.Place(3, 16);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->offset, first->offset);
  EXPECT_EQ(again->resident, 5);  // only entries 5.. go up
  // 17 entries do not fit a 16-entry segment: the table moves, whole.
  std::optional<BlockTableArena::Placement> moved = arena.Place(3, 17);
  ASSERT_TRUE(moved.has_value());
  EXPECT_NE(moved->offset, first->offset);
  EXPECT_EQ(moved->resident, 0);
}

TEST(BlockTableArenaTest, ForgottenSegmentsAreReusedAndAFullArenaSaysSo) {
  BlockTableArena arena(2 * BlockTableArena::kMinSegment);
  ASSERT_TRUE(arena.Place(0, 1).has_value());
  std::optional<BlockTableArena::Placement> second = arena.Place(1, 1);
  ASSERT_TRUE(second.has_value());
  EXPECT_FALSE(arena.Place(2, 1).has_value());
  arena.Forget(1);
  std::optional<BlockTableArena::Placement> reused = arena.Place(2, 1);
  ASSERT_TRUE(reused.has_value());
  EXPECT_EQ(reused->offset, second->offset);
  EXPECT_EQ(reused->resident, 0);
  arena.Reset();
  EXPECT_TRUE(arena.Place(5, 2 * BlockTableArena::kMinSegment).has_value());
}

// Random placements, growth, releases and resets: live segments never
// overlap, stay inside the arena and hold their table; residency only
// survives while a table keeps its place.
TEST(BlockTableArenaTest, LiveSegmentsNeverOverlap) {
  constexpr int64_t kCapacity = 4096;
  BlockTableArena arena(kCapacity);
  std::mt19937 random(7);
  std::map<int32_t, int32_t> blocks;  // slot -> table length
  struct Live {
    int64_t offset;
    int32_t resident;
  };
  std::map<int32_t, Live> placed;
  for (int step = 0; step < 20000; ++step) {
    const int32_t slot = static_cast<int32_t>(random() % 40);
    if (random() % 10 == 0 || blocks[slot] > 1500) {
      arena.Forget(slot);
      blocks.erase(slot);
      placed.erase(slot);
      continue;
    }
    const int32_t length = blocks[slot] += static_cast<int32_t>(random() % 8);
    std::optional<BlockTableArena::Placement> placement = arena.Place(slot, length);
    if (!placement.has_value()) {
      arena.Reset();
      placed.clear();
      placement = arena.Place(slot, length);
      ASSERT_TRUE(placement.has_value());
    }
    auto before = placed.find(slot);
    if (before != placed.end() && before->second.offset == placement->offset) {
      EXPECT_EQ(placement->resident, before->second.resident);
    } else {
      EXPECT_EQ(placement->resident, 0);
    }
    arena.MarkResident(slot, length);
    placed[slot] = {placement->offset, length};
    ASSERT_GE(placement->offset, 0);
    ASSERT_LE(placement->offset + length, kCapacity);
    // Every live table's entries [offset, offset + its length) are its own.
    std::vector<int32_t> owner(kCapacity, -1);
    for (const auto& [live_slot, live] : placed) {
      for (int64_t e = live.offset; e < live.offset + blocks[live_slot]; ++e) {
        ASSERT_EQ(owner[e], -1) << "slots " << owner[e] << " and " << live_slot << " overlap";
        owner[e] = live_slot;
      }
    }
  }
}

}  // namespace
}  // namespace blocksel
