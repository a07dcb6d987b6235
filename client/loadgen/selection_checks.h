// Checks of a selection that need no scores: what SEMANTICS.md fixes for
// rows at known positions whatever the keys are.
#ifndef BLOCKSEL_CLIENT_LOADGEN_SELECTION_CHECKS_H_
#define BLOCKSEL_CLIENT_LOADGEN_SELECTION_CHECKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "client/blocksel_client.h"
#include "kernels/selection_types.h"

namespace blocksel {

// OK when result has the shape (num_heads, rows, topk) and every (head,
// row) lists min(topk, visible) distinct blocks of the row's visible ones,
// the forced (init and local) blocks first in their priority order, then
// -1 to the end. A negative position is a padding row: all -1.
// FAILED_PRECONDITION naming the first violation otherwise.
absl::Status CheckSelectionStructure(const SelectionShape& shape,
                                     absl::Span<const int64_t> row_positions,
                                     const SelectResult& result);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_LOADGEN_SELECTION_CHECKS_H_
