// Plan and Select: kernel choice, splits and workspace for a batch, in one
// place. Host C++ alone (no device code), like kernel_limits.cc.
#include <algorithm>
#include <cstdint>

#include "kernels/gpu/gpu_selection.h"

namespace blocksel::gpu {

void AddSpan(const SelectionShape& shape, int64_t first_position, int32_t num_rows,
             BatchDims* dims) {
  const int64_t last = first_position + num_rows - 1;
  ++dims->num_spans;
  dims->total_rows += num_rows;
  dims->max_rows_per_span = std::max(dims->max_rows_per_span, num_rows);
  dims->max_visible_blocks = std::max(dims->max_visible_blocks, VisibleBlocks(last));
  dims->scored_blocks += DecodeScoredBlocks(shape, last);
  if (first_position < 0) return;  // padding: no tile reads a key
  const int64_t tiles = TilesPerSpan(num_rows, shape.num_heads);
  for (int32_t tile = 0; tile < tiles; ++tile) {
    dims->prefill_tile_blocks += TileBlocks(first_position, num_rows, shape.num_heads, tile);
  }
}

namespace {

bool FitsDecode(const SelectionShape& shape, const BatchDims& dims) {
  return shape.topk <= kKernelLimits.max_decode_topk &&
         int64_t{dims.max_rows_per_span} * shape.num_heads <= kKernelLimits.max_decode_queries;
}

}  // namespace

KernelStatus Plan(const SelectionShape& shape, const BatchDims& dims, const DeviceInfo& device,
                  const PlanOptions& options, SelectionPlan* plan) {
  if (!SupportsShape(shape, nullptr)) return KernelStatus::kUnsupported;
  if (dims.num_spans < 1 || dims.total_rows < 1 || dims.max_rows_per_span < 1) {
    return KernelStatus::kInvalidArgument;
  }
  const bool decode =
      options.force_path ? options.path == KernelPath::kDecode : FitsDecode(shape, dims);
  if (decode && !FitsDecode(shape, dims)) return KernelStatus::kUnsupported;
  plan->shape = shape;
  plan->dims = dims;
  plan->path = decode ? KernelPath::kDecode : KernelPath::kPrefill;
  if (decode) {
    plan->splits = options.splits > 0 ? options.splits : DecodeSplits(device);
    plan->workspace_bytes =
        DecodeWorkspaceBytes(shape, dims.num_spans, dims.max_rows_per_span, dims.scored_blocks);
    plan->zero_workspace_once = true;
  } else {
    if (PrefillSharedBytes(shape) > device.max_shared_bytes_per_cta) {
      return KernelStatus::kUnsupported;  // SupportsShapeOn tells why
    }
    plan->splits = options.splits > 0 ? options.splits : PrefillKeySplits(device, dims);
    plan->workspace_bytes = PrefillWorkspaceBytes(shape, dims.total_rows, plan->splits);
    plan->zero_workspace_once = false;
  }
  return KernelStatus::kOk;
}

KernelStatus Select(const SelectionPlan& plan, const DeviceBatch& batch, void* stream) {
  if (batch.num_spans > plan.dims.num_spans || batch.total_rows > plan.dims.total_rows ||
      batch.workspace_bytes < plan.workspace_bytes) {
    return KernelStatus::kInvalidArgument;
  }
  return plan.path == KernelPath::kDecode
             ? LaunchDecode(plan.shape, batch, plan.dims.max_rows_per_span, plan.splits, stream)
             : LaunchPrefill(plan.shape, batch, plan.dims.max_rows_per_span,
                             plan.dims.max_visible_blocks, plan.splits, stream);
}

}  // namespace blocksel::gpu
