// Top-k over a precomputed block-score tensor (vLLM's second indexer call).
//
// One warp per (head, row). Round r picks, over the row's visible blocks,
// the best priority that ranks after round r-1's winner: no list of taken
// blocks is needed because (priority desc, id asc) is a strict total order.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/select_common.cuh"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

__global__ void __launch_bounds__(kThreads)
    TopKFromScoresKernel(SelectionShape shape, const float* scores, int32_t max_blocks,
                         const int32_t* positions, int32_t rows, int32_t* block_ids) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (pair >= static_cast<int64_t>(rows) * shape.num_heads) return;
  const int lane = threadIdx.x % kWarpSize;
  const int32_t head = static_cast<int32_t>(pair / rows);
  const int32_t row = static_cast<int32_t>(pair % rows);
  int32_t* out = block_ids + (static_cast<int64_t>(head) * rows + row) * shape.topk;
  const int32_t position = positions[row];
  if (position < 0) {
    for (int32_t i = lane; i < shape.topk; i += kWarpSize) out[i] = -1;
    return;
  }
  const int32_t valid = VisibleBlocks(position);
  const int32_t scanned = min(valid, max_blocks);
  const float* row_scores = scores + (static_cast<int64_t>(head) * rows + row) * max_blocks;
  float previous_score = __int_as_float(0x7f800000);  // ranks before everything
  int32_t previous_id = -1;
  for (int32_t rank = 0; rank < shape.topk; ++rank) {
    float best_score = -__int_as_float(0x7f800000);
    int32_t best_id = kNoBlock;
    for (int32_t block = lane; block < scanned; block += kWarpSize) {
      const float raw = row_scores[block];
      const float priority = BlockPriority(isnan(raw) ? kNanScore : raw, block, valid,
                                           shape.init_blocks, shape.local_blocks);
      if (RanksBefore(previous_score, previous_id, priority, block) &&
          RanksBefore(priority, block, best_score, best_id)) {
        best_score = priority;
        best_id = block;
      }
    }
    WarpBest(&best_score, &best_id);
    if (lane == 0) out[rank] = best_id == kNoBlock ? -1 : best_id;
    previous_score = best_score;
    previous_id = best_id;
  }
}

}  // namespace

KernelStatus LaunchTopKFromScores(const SelectionShape& shape, const float* scores,
                                  int32_t max_blocks, const int32_t* positions, int32_t rows,
                                  int32_t* block_ids, void* stream) {
  if (scores == nullptr || positions == nullptr || block_ids == nullptr || max_blocks < 1 ||
      rows < 0 || shape.topk < 1 || shape.num_heads < 1) {
    return KernelStatus::kInvalidArgument;
  }
  if (rows == 0) return KernelStatus::kOk;
  const int64_t warps = static_cast<int64_t>(rows) * shape.num_heads;
  const unsigned blocks = static_cast<unsigned>((warps + kWarps - 1) / kWarps);
  TopKFromScoresKernel<<<blocks, kThreads, 0, static_cast<gpuStream_t>(stream)>>>(
      shape, scores, max_blocks, positions, rows, block_ids);
  return gpuGetLastError() == gpuSuccess ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

}  // namespace blocksel::gpu
