#include "kernels/cpu/top_blocks.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blocksel::cpu {
namespace {

using ::testing::ElementsAre;

std::vector<int32_t> Select(const std::vector<float>& scores, int32_t topk, int32_t init_blocks,
                            int32_t local_blocks) {
  std::vector<int32_t> out(topk, 99);
  SelectTopBlocks(scores.data(), static_cast<int32_t>(scores.size()), topk, init_blocks,
                  local_blocks, out.data());
  return out;
}

TEST(SelectTopBlocks, OrdersByScoreThenByAscendingId) {
  EXPECT_THAT(Select({1, 5, 3, 5, 2, 0}, 4, 0, 0), ElementsAre(1, 3, 2, 4));
  EXPECT_THAT(Select({7, 7, 7, 7}, 3, 0, 0), ElementsAre(0, 1, 2));
}

TEST(SelectTopBlocks, LocalBlockComesFirstAndCountsInsideTopk) {
  // M3 defaults: init 0, local 1. Block 4 is the last visible one.
  EXPECT_THAT(Select({9, 1, 8, 2, -5}, 3, 0, 1), ElementsAre(4, 0, 2));
}

TEST(SelectTopBlocks, InitBlocksOutrankLocalBlocks) {
  // init 2, local 2, topk 3: both init blocks, then the lower local block.
  EXPECT_THAT(Select({-1, -2, 50, 40, -3, -4}, 3, 2, 2), ElementsAre(0, 1, 4));
}

TEST(SelectTopBlocks, BlockThatIsInitAndLocalCountsAsLocal) {
  // Two visible blocks, init 2, local 1: block 1 is local (1e29), block 0 init.
  EXPECT_THAT(Select({0, 0}, 2, 2, 1), ElementsAre(0, 1));
  EXPECT_THAT(Select({0, 0}, 1, 2, 1), ElementsAre(0));
}

TEST(SelectTopBlocks, PadsWithMinusOneWhenFewerBlocksAreVisible) {
  EXPECT_THAT(Select({3, 1}, 4, 0, 1), ElementsAre(1, 0, -1, -1));
  EXPECT_THAT(Select({}, 2, 0, 1), ElementsAre(-1, -1));
}

TEST(SelectTopBlocks, ForcedBlocksIgnoreTheirScores) {
  EXPECT_THAT(Select({-1e30f, 2, -1e30f}, 2, 1, 1), ElementsAre(0, 2));
}

TEST(SelectTopBlocks, NegativeInfinityStillRanksLast) {
  const float inf = __builtin_inff();
  EXPECT_THAT(Select({-inf, -1e30f, 0}, 3, 0, 0), ElementsAre(2, 1, 0));
}

}  // namespace
}  // namespace blocksel::cpu
