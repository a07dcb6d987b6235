// Which sparse layers a server selects for and which reuse another layer's
// selection (--select_every, --selecting_layers), as its GetInfo says.
#ifndef BLOCKSEL_CLIENT_LAYER_GROUPS_H_
#define BLOCKSEL_CLIENT_LAYER_GROUPS_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "blocksel/v1/block_selector.pb.h"

namespace blocksel {

// The selecting layer whose selection sparse layer `layer` uses, from the
// server's selecting layers (ascending): `layer` itself when it selects or
// when the list is empty (every sparse layer selects), and -1 for a layer
// before the first selecting one (no sparse layer).
int64_t SelectionSourceOf(absl::Span<const int32_t> selecting_layers, int64_t layer);

// GetInfo's selecting layers when the server reuses selections (fewer
// selecting layers than sparse ones); empty when every sparse layer
// selects, including an older server that lists none.
std::vector<int32_t> ReusingSelectingLayers(const v1::ModelConfig& model);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_LAYER_GROUPS_H_
