#include "kernels/selection_types.h"

namespace blocksel {

KernelStatus ValidateSelection(const SelectionShape& shape, const SelectionBatch& batch) {
  if (shape.num_heads <= 0 || shape.num_heads > kMaxHeads || shape.head_dim <= 0 ||
      shape.head_dim % 16 != 0 || shape.head_dim > kMaxHeadDim || shape.topk <= 0 ||
      shape.init_blocks < 0 || shape.local_blocks < 0) {
    return KernelStatus::kInvalidArgument;
  }
  if (batch.total_rows < 0 || batch.num_spans < 0 || batch.num_pages < 0) {
    return KernelStatus::kInvalidArgument;
  }
  if (batch.total_rows > 0 && (batch.queries == nullptr || batch.block_ids == nullptr)) {
    return KernelStatus::kInvalidArgument;
  }
  if (batch.block_scores != nullptr && batch.max_blocks < 1) {
    return KernelStatus::kInvalidArgument;
  }
  if (batch.num_spans > 0 && batch.spans == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    if (span.num_rows < 0 || span.first_row < 0 ||
        span.first_row > batch.total_rows - span.num_rows) {
      return KernelStatus::kInvalidArgument;
    }
    const int64_t last_position = static_cast<int64_t>(span.first_position) + span.num_rows - 1;
    if (span.num_rows > 0 && last_position >= 0 &&
        (span.block_table == nullptr || batch.key_pool == nullptr)) {
      return KernelStatus::kInvalidArgument;
    }
  }
  return KernelStatus::kOk;
}

}  // namespace blocksel
