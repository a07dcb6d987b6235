#include "server/engine/model_config.h"

#include <cstdint>

#include "gtest/gtest.h"
#include "server/blocksel_server.h"

namespace blocksel {
namespace {

// The capacity table of docs/OPERATIONS.md, from the code: M3's defaults
// (60 layers, sparse from 3, D = 128).
TEST(ModelConfigTest, CapacityNumbersOfTheOperationsGuide) {
  ServerConfig config;
  config.cache_bytes = int64_t{64} << 30;
  ASSERT_EQ(config.model.num_sparse_layers(), 57);
  EXPECT_EQ(config.model.TokenBytes(), 256);
  EXPECT_EQ(config.model.PageBytes(), 1'867'776);
  EXPECT_EQ(config.NumPages(), 36'792);
  EXPECT_EQ(config.NumPages() * kBlockSize, 4'709'376);
  EXPECT_EQ(1024 * config.model.PageBytes(), int64_t{1'912'602'624});  // 1.78 GiB

  config.model.key_dtype = KeyDtype::kFp8E4m3;
  EXPECT_EQ(config.model.TokenBytes(), 128);
  EXPECT_EQ(config.model.PageBytes(), 933'888);
  EXPECT_EQ(config.NumPages(), 73'584);
  EXPECT_EQ(config.NumPages() * kBlockSize, 9'418'752);
}

}  // namespace
}  // namespace blocksel
