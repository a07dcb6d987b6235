#include "client/layer_groups.h"

#include <algorithm>

namespace blocksel {

int64_t SelectionSourceOf(absl::Span<const int32_t> selecting_layers, int64_t layer) {
  if (selecting_layers.empty()) return layer;
  // The last selecting layer at or before `layer`.
  const auto after = std::upper_bound(selecting_layers.begin(), selecting_layers.end(), layer);
  return after == selecting_layers.begin() ? -1 : *(after - 1);
}

std::vector<int32_t> ReusingSelectingLayers(const v1::ModelConfig& model) {
  const uint32_t sparse_layers = model.num_layers() - model.first_sparse_layer();
  if (model.selecting_layers_size() == 0 ||
      static_cast<uint32_t>(model.selecting_layers_size()) >= sparse_layers) {
    return {};
  }
  return std::vector<int32_t>(model.selecting_layers().begin(), model.selecting_layers().end());
}

}  // namespace blocksel
