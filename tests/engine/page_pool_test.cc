#include "server/engine/page_pool.h"

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

using Pages = std::vector<int32_t>;

TEST(PagePoolTest, StartsWithEveryPageFree) {
  PagePool pool(8);
  EXPECT_EQ(pool.total_pages(), 8);
  EXPECT_EQ(pool.free_pages(), 8);
}

TEST(PagePoolTest, HandsOutPagesFromZeroUpward) {
  PagePool pool(5);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.Allocate(3, &pages).ok());
  EXPECT_EQ(pages, (Pages{0, 1, 2}));
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_EQ(pool.total_pages(), 5);
}

TEST(PagePoolTest, AllocateAppendsToWhatTheVectorAlreadyHolds) {
  PagePool pool(4);
  std::vector<int32_t> pages = {77};
  ASSERT_TRUE(pool.Allocate(2, &pages).ok());
  EXPECT_EQ(pages, (Pages{77, 0, 1}));
}

TEST(PagePoolTest, AllocatingZeroPagesSucceedsAndTakesNothing) {
  PagePool pool(2);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.Allocate(0, &pages).ok());
  EXPECT_TRUE(pages.empty());
  EXPECT_EQ(pool.free_pages(), 2);
}

TEST(PagePoolTest, CanHandOutEveryPage) {
  PagePool pool(4);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.Allocate(4, &pages).ok());
  EXPECT_EQ(pages, (Pages{0, 1, 2, 3}));
  EXPECT_EQ(pool.free_pages(), 0);
}

TEST(PagePoolTest, ExhaustionIsResourceExhaustedAndTakesNothing) {
  PagePool pool(4);
  std::vector<int32_t> first;
  ASSERT_TRUE(pool.Allocate(3, &first).ok());

  // One page is free; asking for two must not hand out the one.
  std::vector<int32_t> second = {42};
  absl::Status status = pool.Allocate(2, &second);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(second, (Pages{42}));
  EXPECT_EQ(pool.free_pages(), 1);

  // The page that was free is still there for a request that fits.
  ASSERT_TRUE(pool.Allocate(1, &second).ok());
  EXPECT_EQ(second, (Pages{42, 3}));
  EXPECT_EQ(pool.free_pages(), 0);
}

TEST(PagePoolTest, EmptyPoolRefusesEvenOnePage) {
  PagePool pool(0);
  std::vector<int32_t> pages;
  EXPECT_EQ(pool.Allocate(1, &pages).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(pages.empty());
  EXPECT_EQ(pool.free_pages(), 0);
}

TEST(PagePoolTest, FreeReturnsPagesToTheCount) {
  PagePool pool(6);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.Allocate(4, &pages).ok());
  pool.Free(pages);
  EXPECT_EQ(pool.free_pages(), 6);
  EXPECT_EQ(pool.total_pages(), 6);
}

TEST(PagePoolTest, FreedPagesAreReusedLastInFirstOut) {
  PagePool pool(8);
  std::vector<int32_t> first;
  std::vector<int32_t> second;
  ASSERT_TRUE(pool.Allocate(3, &first).ok());   // 0 1 2
  ASSERT_TRUE(pool.Allocate(2, &second).ok());  // 3 4

  pool.Free(first);
  // The pages just freed come back before the never-used 5..7, in the
  // order they were handed out the first time.
  std::vector<int32_t> reused;
  ASSERT_TRUE(pool.Allocate(3, &reused).ok());
  EXPECT_EQ(reused, (Pages{0, 1, 2}));

  pool.Free(reused);
  pool.Free(second);
  // The most recent Free is on top of the stack: 3 4 first, then 0 1 2,
  // and the never-used pages last.
  std::vector<int32_t> again;
  ASSERT_TRUE(pool.Allocate(4, &again).ok());
  EXPECT_EQ(again, (Pages{3, 4, 0, 1}));
  std::vector<int32_t> rest;
  ASSERT_TRUE(pool.Allocate(4, &rest).ok());
  EXPECT_EQ(rest, (Pages{2, 5, 6, 7}));
  EXPECT_EQ(pool.free_pages(), 0);
}

TEST(PagePoolTest, ExhaustedThenFreedPoolServesAgain) {
  PagePool pool(2);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.Allocate(2, &pages).ok());
  std::vector<int32_t> refused;
  ASSERT_EQ(pool.Allocate(1, &refused).code(), absl::StatusCode::kResourceExhausted);

  pool.Free({pages[1]});
  EXPECT_EQ(pool.free_pages(), 1);
  std::vector<int32_t> granted;
  ASSERT_TRUE(pool.Allocate(1, &granted).ok());
  EXPECT_EQ(granted, (Pages{1}));
}

}  // namespace
}  // namespace blocksel
