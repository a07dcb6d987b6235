#include "client/loadgen/selection_checks.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace blocksel {

absl::Status CheckSelectionStructure(const SelectionShape& shape,
                                     absl::Span<const int64_t> row_positions,
                                     const SelectResult& result) {
  const int64_t rows = static_cast<int64_t>(row_positions.size());
  if (result.num_heads != shape.num_heads || result.total_q != rows || result.topk != shape.topk ||
      static_cast<int64_t>(result.block_ids.size()) !=
          int64_t{shape.num_heads} * rows * shape.topk) {
    return absl::FailedPreconditionError(
        absl::StrCat("selection shape (", result.num_heads, ", ", result.total_q, ", ", result.topk,
                     ") with ", result.block_ids.size(), " ids; expected (", shape.num_heads, ", ",
                     rows, ", ", shape.topk, ")"));
  }
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t position = row_positions[row];
    const int32_t visible = VisibleBlocks(position);
    // Forced blocks in priority order: init-only (1e30) before local
    // (1e29, which wins for a block that is both), each by id.
    std::vector<std::pair<int, int32_t>> forced;  // (rank, id)
    for (int32_t block = 0; block < visible; ++block) {
      const bool local = block >= visible - shape.local_blocks;
      const bool init = block < shape.init_blocks;
      if (local || init) forced.emplace_back(local ? 1 : 0, block);
    }
    std::sort(forced.begin(), forced.end());
    const int32_t valid = std::min(visible, shape.topk);
    for (int32_t head = 0; head < shape.num_heads; ++head) {
      absl::flat_hash_set<int32_t> seen;
      for (int32_t slot = 0; slot < shape.topk; ++slot) {
        const int32_t id = result.at(head, static_cast<int32_t>(row), slot);
        auto fail = [&](absl::string_view what) {
          return absl::FailedPreconditionError(absl::StrCat("head ", head, " row ", row,
                                                            " (position ", position, ") slot ",
                                                            slot, ": block ", id, " ", what));
        };
        if (slot >= valid) {
          if (id != -1) return fail("where -1 was due");
          continue;
        }
        if (id < 0 || id >= visible) return fail("is not visible");
        if (!seen.insert(id).second) return fail("is repeated");
        if (slot < static_cast<int32_t>(forced.size()) && id != forced[slot].second) {
          return fail(absl::StrCat("where forced block ", forced[slot].second, " was due"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace blocksel
