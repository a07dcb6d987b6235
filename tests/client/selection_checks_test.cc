#include "client/loadgen/selection_checks.h"

#include <cstdint>
#include <random>
#include <vector>

#include "client/reference_selection.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

class SelectionChecksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    shape_.num_heads = 2;
    shape_.head_dim = 16;
    shape_.topk = 4;
    shape_.init_blocks = 1;
    shape_.local_blocks = 1;
    // Rows at 1000 (8 visible blocks), 200 (2 blocks) and padding.
    positions_ = {1000, 200, -1};
    std::mt19937 random(3);
    std::normal_distribution<float> normal;
    keys_.resize(1001 * shape_.head_dim);
    for (float& k : keys_) k = normal(random);
    queries_.resize(3 * shape_.num_heads * shape_.head_dim);
    for (float& q : queries_) q = normal(random);
    result_.num_heads = shape_.num_heads;
    result_.total_q = 3;
    result_.topk = shape_.topk;
    result_.block_ids =
        ReferenceSelect(shape_, {{keys_.data(), 1000, 1}, {keys_.data(), 200, 1}, {nullptr, -1, 1}},
                        queries_.data());
  }

  int32_t& Id(int head, int row, int slot) {
    return result_.block_ids[(head * 3 + row) * shape_.topk + slot];
  }

  SelectionShape shape_;
  std::vector<int64_t> positions_;
  std::vector<float> keys_;
  std::vector<float> queries_;
  SelectResult result_;
};

TEST_F(SelectionChecksTest, TheReferenceSelectionPasses) {
  EXPECT_TRUE(CheckSelectionStructure(shape_, positions_, result_).ok());
  // Forced blocks first: init block 0, then local block 7.
  EXPECT_EQ(Id(0, 0, 0), 0);
  EXPECT_EQ(Id(0, 0, 1), 7);
}

TEST_F(SelectionChecksTest, EachViolationIsCaught) {
  const SelectResult good = result_;
  auto expect_caught = [&](const char* what) {
    EXPECT_EQ(CheckSelectionStructure(shape_, positions_, result_).code(),
              absl::StatusCode::kFailedPrecondition)
        << what;
    result_ = good;
  };
  Id(1, 0, 3) = Id(1, 0, 2);
  expect_caught("a repeated block");
  Id(0, 0, 2) = 8;
  expect_caught("a block past the row's visible ones");
  std::swap(Id(0, 0, 0), Id(0, 0, 1));
  expect_caught("forced blocks out of order");
  Id(1, 1, 3) = 1;
  expect_caught("a block where -1 was due (the row sees 2 blocks)");
  Id(0, 2, 0) = 0;
  expect_caught("a block in a padding row");
  result_.topk = 3;
  expect_caught("the wrong shape");
}

}  // namespace
}  // namespace blocksel
