#include "client/layer_groups.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace blocksel {
namespace {

TEST(LayerGroupsTest, ALayerUsesTheSelectionOfTheLastSelectingLayerAtOrBeforeIt) {
  const std::vector<int32_t> selecting = {3, 7, 11};
  EXPECT_EQ(SelectionSourceOf(selecting, 3), 3);
  EXPECT_EQ(SelectionSourceOf(selecting, 6), 3);
  EXPECT_EQ(SelectionSourceOf(selecting, 7), 7);
  EXPECT_EQ(SelectionSourceOf(selecting, 59), 11);
  EXPECT_EQ(SelectionSourceOf(selecting, 2), -1) << "before the first selecting layer";
  EXPECT_EQ(SelectionSourceOf({}, 5), 5) << "without a list every layer selects";
}

TEST(LayerGroupsTest, OnlyAServerThatReusesSelectionsGivesItsSelectingLayers) {
  v1::ModelConfig model;
  model.set_num_layers(8);
  model.set_first_sparse_layer(3);  // 5 sparse layers
  EXPECT_TRUE(ReusingSelectingLayers(model).empty()) << "an older server lists none";
  for (const uint32_t layer : {3u, 4u, 5u, 6u, 7u}) model.add_selecting_layers(layer);
  EXPECT_TRUE(ReusingSelectingLayers(model).empty()) << "every sparse layer selects";
  model.clear_selecting_layers();
  model.add_selecting_layers(3);
  model.add_selecting_layers(6);
  EXPECT_EQ(ReusingSelectingLayers(model), (std::vector<int32_t>{3, 6}));
}

}  // namespace
}  // namespace blocksel
