#include "server/engine/model_config.h"

#include <cstdint>
#include <vector>

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

// M3 with every fourth sparse layer selecting: 15 of 57 layers store keys,
// so the same cache holds 3.8 times the tokens.
TEST(ModelConfigTest, CapacityWhenEveryFourthLayerSelects) {
  ServerConfig config;
  config.cache_bytes = int64_t{64} << 30;
  config.model.selecting_layers = EveryKthLayer(3, 60, 4);
  ASSERT_TRUE(config.model.Validate().ok()) << config.model.Validate();
  EXPECT_EQ(config.model.num_selecting_layers(), 15);
  EXPECT_EQ(config.model.PageBytes(), 491'520);
  EXPECT_EQ(config.NumPages(), 139'810);
  EXPECT_EQ(config.NumPages() * kBlockSize, 17'895'680);
}

// The same with two reusing layers audited: 17 of 57 layers store keys.
TEST(ModelConfigTest, AuditedLayersStoreKeysAndCountInTheCapacity) {
  ServerConfig config;
  config.cache_bytes = int64_t{64} << 30;
  config.model.selecting_layers = EveryKthLayer(3, 60, 4);
  config.model.audited_layers = {4, 9};
  ASSERT_TRUE(config.model.Validate().ok()) << config.model.Validate();
  EXPECT_EQ(config.model.num_selecting_layers(), 15);
  EXPECT_EQ(config.model.num_key_layers(), 17);
  EXPECT_EQ(config.model.PageBytes(), 256 * 128 * 17);
  EXPECT_EQ(config.NumPages(), (int64_t{64} << 30) / (256 * 128 * 17));
  const ModelConfig& model = config.model;
  EXPECT_TRUE(model.IsAudited(4));
  EXPECT_FALSE(model.IsSelecting(4));
  EXPECT_EQ(model.SelectionSource(4), 3) << "an audited layer still reuses";
  const std::vector<int32_t> key_layers = model.KeyLayerList();
  ASSERT_EQ(key_layers.size(), 17u);
  EXPECT_EQ(std::vector<int32_t>(key_layers.begin(), key_layers.begin() + 5),
            (std::vector<int32_t>{3, 4, 7, 9, 11}));
  for (const int32_t layer : {3, 4, 7, 9, 11, 59}) {
    ASSERT_GE(model.KeyLayerIndex(layer), 0) << layer;
    EXPECT_EQ(key_layers[model.KeyLayerIndex(layer)], layer);
  }
  EXPECT_EQ(model.KeyLayerIndex(5), -1) << "a reusing layer that is not audited";
}

TEST(ModelConfigTest, OnlyReusingSparseLayersCanBeAudited) {
  ModelConfig model;
  model.selecting_layers = {3, 7};
  model.audited_layers = {7};
  EXPECT_EQ(model.Validate().message(),
            "invalid model config: audited layer 7 is a selecting layer (selecting layers are "
            "3,7); audit only layers that reuse a selection");
  model.audited_layers = {5, 4};
  EXPECT_EQ(model.Validate().message(),
            "invalid model config: audited layers must be ascending sparse layers in [3, 60), "
            "got 5,4");
  model.audited_layers = {60};
  EXPECT_EQ(model.Validate().code(), absl::StatusCode::kInvalidArgument);
  model.audited_layers = {4, 8};
  EXPECT_TRUE(model.Validate().ok()) << model.Validate();
}

TEST(ModelConfigTest, ReusingLayersMapToTheSelectingLayerBeforeThem) {
  ModelConfig model;  // sparse layers 3 .. 59
  model.selecting_layers = {3, 4, 10};
  EXPECT_EQ(model.num_selecting_layers(), 3);
  EXPECT_EQ(model.SelectionSource(3), 3);
  EXPECT_EQ(model.SelectionSource(5), 4);
  EXPECT_EQ(model.SelectionSource(59), 10);
  EXPECT_EQ(model.KeyLayerIndex(4), 1);
  EXPECT_EQ(model.KeyLayerIndex(10), 2);
  EXPECT_EQ(model.KeyLayerIndex(5), -1);
  EXPECT_EQ(model.KeyLayerIndex(2), -1);  // dense
  EXPECT_EQ(model.KeyLayerList(), (std::vector<int32_t>{3, 4, 10}));
  EXPECT_EQ(model.SelectingLayerList(), (std::vector<int32_t>{3, 4, 10}));
  // Without a list every sparse layer selects and is its own source.
  model.selecting_layers.clear();
  EXPECT_EQ(model.num_selecting_layers(), 57);
  EXPECT_EQ(model.KeyLayerIndex(5), 2);
  EXPECT_EQ(model.SelectionSource(5), 5);
  EXPECT_EQ(model.KeyLayerList()[2], 5);
  EXPECT_EQ(model.SelectingLayerList().size(), 57u);
}

TEST(ModelConfigTest, SelectingLayersMustStartAtTheFirstSparseLayerAndAscend) {
  ModelConfig model;
  model.selecting_layers = {4, 8};
  EXPECT_EQ(model.Validate().message(),
            "invalid model config: selecting layers must start at first_sparse_layer=3 (it has "
            "no earlier selection to reuse), got 4");
  model.selecting_layers = {3, 9, 7};
  EXPECT_EQ(model.Validate().message(),
            "invalid model config: selecting layers must be ascending sparse layers in [3, 60), "
            "got 3,9,7");
  model.selecting_layers = {3, 60};
  EXPECT_EQ(model.Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ModelConfigTest, ParsesLayerListsAndEveryKth) {
  EXPECT_EQ(EveryKthLayer(3, 12, 4), (std::vector<int32_t>{3, 7, 11}));
  EXPECT_EQ(*ParseLayerList("3, 7,11"), (std::vector<int32_t>{3, 7, 11}));
  EXPECT_EQ(ParseLayerList("3,x").status().message(),
            "layer list '3,x': 'x' is not a layer number; write e.g. 3,7,11");
}

}  // namespace
}  // namespace blocksel
