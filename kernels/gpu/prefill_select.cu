// Prefill selection: many query rows per sequence.
//
// One CTA takes a tile of TileQueries queries (row-major (row, head) pairs
// of one sequence, so all H heads of a row share the tile) and walks every
// key page the tile can see. Each warp scores its 32 (16 for head dims
// above 128) queries against the page's 128 keys with bf16 matrix instructions (mma.sync m16n8k16,
// fp32 accumulate; fp8 keys are widened to bf16 exactly), takes the causal max per query, and folds
// it into a top-k list per query kept in shared memory. Pages are staged in shared memory with
// asynchronous copies, the next one in flight while the current one is scored. No score tensor is
// written. Grid: (tiles of the longest span, spans, key splits).
//
// Key split: a chunk with few tiles and a long prefix would leave most SMs
// idle, so the tile's visible blocks are divided over key_splits CTAs
// (blockIdx.z). Each writes its sorted partial lists to the workspace and
// PrefillMergeKernel merges them per (row, head). Every block lands in
// exactly one partial list with the priority the unsplit kernel gives it,
// so the merge is exact.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kGroups = kThreads / kGroupLanes;

// 16-query m-tiles per lane group: two up to head dim 128, so each key
// fragment read from shared memory feeds two matrix instructions (one feeds
// too few to keep the matrix units busy); one above, where the fragments of
// 32 queries would not fit in registers.
__host__ __device__ constexpr int MTilesFor(int k_steps) { return k_steps <= 8 ? 2 : 1; }
// Queries (row, head pairs) one CTA scores.
__host__ __device__ constexpr int TileQueries(int k_steps) {
  return 16 * MTilesFor(k_steps) * kGroups;
}

struct PrefillParams {
  SelectionShape shape;
  DeviceBatch batch;
  float* scores;       // score mode: [H][total_rows][max_blocks]
  int32_t max_blocks;  // score mode: the scores tensor's last dimension
  int32_t key_splits;  // gridDim.z; > 1 only in top-k mode
};

// Key-split workspace: [key_splits][total_rows * H][topk] scores, then the
// same of ids. A list is indexed by (first_row of its span + row) * H + head.
struct SplitLists {
  float* scores;
  int32_t* ids;
};

__host__ __device__ inline SplitLists CarveSplitLists(void* workspace, const SelectionShape& shape,
                                                      int32_t total_rows, int32_t key_splits) {
  const int64_t entries =
      static_cast<int64_t>(key_splits) * total_rows * shape.num_heads * shape.topk;
  auto* scores = static_cast<float*>(workspace);
  return {scores, reinterpret_cast<int32_t*>(scores + entries)};
}

// Start of the scores row of query q (a (row, head) pair) of span.
__device__ __forceinline__ int64_t ScoreIndex(const PrefillParams& params, int32_t q,
                                              const DeviceSpan& span, int32_t heads) {
  return (static_cast<int64_t>(q % heads) * params.batch.total_rows + span.first_row + q / heads) *
         params.max_blocks;
}

// kWriteScores: write every block score (vLLM's score entry point) instead
// of keeping top-k lists.
template <KeyDtype kDtype, bool kWriteScores, int kKSteps>
__global__ void __launch_bounds__(kThreads, 2) PrefillKernel(PrefillParams params) {
  constexpr int kMTiles = MTilesFor(kKSteps);
  constexpr int kTileQueries = TileQueries(kKSteps);
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const DeviceSpan span = batch.spans[blockIdx.y];
  const int32_t heads = shape.num_heads;
  const int32_t dim = shape.head_dim;
  const int32_t topk = shape.topk;
  const int32_t num_queries = span.num_rows * heads;
  const int32_t tile_first = blockIdx.x * kTileQueries;
  if (tile_first >= num_queries) return;
  const int32_t tile_queries = min(kTileQueries, num_queries - tile_first);
  // With a key split, the merge kernel is scheduled early and waits for
  // this grid on the device.
  AllowDependentLaunch();

  unsigned char* staged[2] = {shared_raw, shared_raw + StagedPageBytes<kDtype>(dim)};
  // fp8 only: the current page widened to bf16.
  unsigned char* widened = shared_raw + 2 * StagedPageBytes<kDtype>(dim);
  float* list_scores = reinterpret_cast<float*>(widened + WidenedBytes<kDtype>(dim));
  int32_t* list_ids = reinterpret_cast<int32_t*>(list_scores + kTileQueries * topk);
  for (int i = threadIdx.x; i < kTileQueries * topk && !kWriteScores; i += kThreads) {
    list_scores[i] = -__int_as_float(0x7f800000);
    list_ids[i] = kNoBlock;
  }

  const int group = threadIdx.x / kGroupLanes;
  const int lane = threadIdx.x % kGroupLanes;
  const int32_t group_first = tile_first + group * 16 * kMTiles;
  // This lane's queries (rows lane/4 and lane/4 + 8 of each m-tile) and
  // their positions.
  uint32_t a[kMTiles][kKSteps][4];
  int32_t queries[kMTiles][2];
  int32_t positions[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    LoadQueryFragments<kKSteps>(batch.queries + static_cast<int64_t>(span.first_row) * heads * dim,
                                group_first + 16 * m, num_queries, dim, a[m]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      queries[m][h] = group_first + 16 * m + lane / 4 + 8 * h;
      positions[m][h] = span.first_position + queries[m][h] / heads;
    }
  }

  const int32_t last_position = span.first_position + (tile_first + tile_queries - 1) / heads;
  const int32_t num_blocks = VisibleBlocks(last_position);
  // This CTA's share of the tile's blocks (all of them without a split).
  const int32_t first_block = static_cast<int32_t>(int64_t{num_blocks} * blockIdx.z / gridDim.z);
  const int32_t end_block =
      static_cast<int32_t>(int64_t{num_blocks} * (blockIdx.z + 1) / gridDim.z);
  const int64_t page_bytes = static_cast<int64_t>(kBlockSize) * dim * kKeyBytes<kDtype>;
  auto page = [&](int32_t block) {
    return static_cast<const char*>(batch.key_pool) +
           static_cast<int64_t>(batch.block_table[span.table_offset + block]) * page_bytes;
  };
  if (first_block < end_block) StagePage<kDtype>(page(first_block), staged[0], dim, kThreads);
  for (int32_t block = first_block; block < end_block; ++block) {
    const int buffer = (block - first_block) % 2;
    if (block + 1 < end_block) {
      StagePage<kDtype>(page(block + 1), staged[1 - buffer], dim, kThreads);
      WaitStagedPages<1>();
    } else {
      WaitStagedPages<0>();
    }
    const int32_t block_start = block * kBlockSize;
    float best[kMTiles][2];
    const unsigned char* keys = staged[buffer];
    if constexpr (kDtype == KeyDtype::kFp8E4m3) {
      WidenStagedFp8(keys, widened, dim, kThreads);
      __syncthreads();
      keys = widened;
    }
    // Every query of the tile sees a page that ends before the tile's
    // first row: all but the diagonal pages.
    if (block_start + kBlockSize - 1 <= span.first_position + tile_first / heads) {
      ScoreStagedTiles<kKSteps, kMTiles, false>(a, keys, 0, kBlockSize / 8, block_start, positions,
                                                best);
    } else {
      ScoreStagedTiles<kKSteps, kMTiles, true>(a, keys, 0, kBlockSize / 8, block_start, positions,
                                               best);
    }
    // Lanes 0, 4, ... own their queries: their score rows, or their top-k
    // lists.
    if (lane % 4 == 0) {
#pragma unroll
      for (int i = 0; i < 2 * kMTiles; ++i) {
        const int32_t query = queries[i / 2][i % 2];
        const int32_t position = positions[i / 2][i % 2];
        if (query >= num_queries) continue;
        const bool visible = block_start <= position;
        if constexpr (kWriteScores) {
          if (block < params.max_blocks) {
            params.scores[ScoreIndex(params, query, span, heads) + block] =
                visible ? best[i / 2][i % 2] : -__int_as_float(0x7f800000);
          }
        } else if (visible) {
          const int32_t local = query - tile_first;
          InsertCandidate(list_scores + local * topk, list_ids + local * topk, topk,
                          BlockPriority(best[i / 2][i % 2], block, VisibleBlocks(position),
                                        shape.init_blocks, shape.local_blocks),
                          block);
        }
      }
    }
    __syncthreads();  // the next iteration stages into this page's buffer
  }
  if constexpr (kWriteScores) {
    // Blocks past the tile's last visible one: no row of the tile sees them.
    const int32_t fill = params.max_blocks - min(num_blocks, params.max_blocks);
    for (int i = threadIdx.x; i < tile_queries * fill; i += kThreads) {
      params
          .scores[ScoreIndex(params, tile_first + i / fill, span, heads) + num_blocks + i % fill] =
          -__int_as_float(0x7f800000);
    }
    return;
  }
  __syncthreads();
  if (params.key_splits > 1) {
    const SplitLists lists =
        CarveSplitLists(batch.workspace, shape, batch.total_rows, params.key_splits);
    const int64_t base =
        ((static_cast<int64_t>(blockIdx.z) * batch.total_rows + span.first_row) * heads +
         tile_first) *
        topk;
    for (int i = threadIdx.x; i < tile_queries * topk; i += kThreads) {
      lists.scores[base + i] = list_scores[i];
      lists.ids[base + i] = list_ids[i];
    }
    return;
  }
  for (int i = threadIdx.x; i < tile_queries * topk; i += kThreads) {
    const int32_t q = tile_first + i / topk;
    const int32_t id = list_ids[i];
    batch.block_ids[(static_cast<int64_t>(q % heads) * batch.total_rows + span.first_row +
                     q / heads) *
                        topk +
                    i % topk] = id == kNoBlock ? -1 : id;
  }
}

constexpr int kMergeThreads = 128;

// One thread per (row, head) of the batch: a k-way merge of its key_splits
// sorted partial lists into the final ids.
__global__ void __launch_bounds__(kMergeThreads) PrefillMergeKernel(PrefillParams params) {
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (query >= static_cast<int64_t>(batch.total_rows) * shape.num_heads) return;
  const int32_t topk = shape.topk;
  const int32_t row = static_cast<int32_t>(query / shape.num_heads);
  const int32_t head = static_cast<int32_t>(query % shape.num_heads);
  int32_t* out = batch.block_ids + (static_cast<int64_t>(head) * batch.total_rows + row) * topk;
  WaitForPriorGrid();  // the partial lists
  const SplitLists lists =
      CarveSplitLists(batch.workspace, shape, batch.total_rows, params.key_splits);
  const int64_t split_stride = static_cast<int64_t>(batch.total_rows) * shape.num_heads * topk;
  int32_t taken[kMaxPrefillKeySplits] = {};
  for (int32_t rank = 0; rank < topk; ++rank) {
    float best_score = -__int_as_float(0x7f800000);
    int32_t best_id = kNoBlock;
    int32_t best_split = 0;
    for (int32_t split = 0; split < params.key_splits; ++split) {
      if (taken[split] >= topk) continue;
      const int64_t index = split * split_stride + query * topk + taken[split];
      if (RanksBefore(lists.scores[index], lists.ids[index], best_score, best_id)) {
        best_score = lists.scores[index];
        best_id = lists.ids[index];
        best_split = split;
      }
    }
    out[rank] = best_id == kNoBlock ? -1 : best_id;
    ++taken[best_split];
  }
}

template <KeyDtype kDtype, bool kWriteScores>
KernelStatus Launch(const PrefillParams& params, dim3 grid, gpuStream_t stream) {
  const int64_t shared =
      2 * StagedPageBytes<kDtype>(params.shape.head_dim) +
      WidenedBytes<kDtype>(params.shape.head_dim) +
      (kWriteScores
           ? 0
           : static_cast<int64_t>(TileQueries(params.shape.head_dim / 16)) * params.shape.topk * 8);
  if (shared > 200 * 1024) return KernelStatus::kUnsupported;
  // One instantiation per head dim, so query fragments take only the
  // registers the head dim needs (occupancy).
  void (*kernel)(PrefillParams) = nullptr;
  switch (params.shape.head_dim) {
    case 16:
      kernel = &PrefillKernel<kDtype, kWriteScores, 1>;
      break;
    case 32:
      kernel = &PrefillKernel<kDtype, kWriteScores, 2>;
      break;
    case 64:
      kernel = &PrefillKernel<kDtype, kWriteScores, 4>;
      break;
    case 128:
      kernel = &PrefillKernel<kDtype, kWriteScores, 8>;
      break;
    default:
      kernel = &PrefillKernel<kDtype, kWriteScores, 16>;
      break;
  }
  if (gpuFuncSetMaxDynamicSharedMemory(kernel, shared) != gpuSuccess) {
    return KernelStatus::kDeviceError;
  }
  kernel<<<grid, kThreads, shared, stream>>>(params);
  if (gpuGetLastError() != gpuSuccess) return KernelStatus::kDeviceError;
  if (params.key_splits == 1) return KernelStatus::kOk;
  const int64_t queries = static_cast<int64_t>(params.batch.total_rows) * params.shape.num_heads;
  return LaunchDependent(PrefillMergeKernel,
                         dim3(static_cast<unsigned>((queries + kMergeThreads - 1) / kMergeThreads)),
                         dim3(kMergeThreads), 0, stream, params) == gpuSuccess
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

int64_t TilesPerSpan(const SelectionShape& shape, int32_t max_rows_per_span) {
  const int tile_queries = TileQueries(shape.head_dim / 16);
  return (static_cast<int64_t>(max_rows_per_span) * shape.num_heads + tile_queries - 1) /
         tile_queries;
}

KernelStatus LaunchTiles(const SelectionShape& shape, const DeviceBatch& batch,
                         int32_t max_rows_per_span, int32_t key_splits, float* scores,
                         int32_t max_blocks, void* stream) {
  if (!SupportsShape(shape, nullptr) || batch.num_spans < 1 || batch.num_spans > 65535 ||
      max_rows_per_span < 1) {
    return KernelStatus::kUnsupported;
  }
  if (key_splits < 1 || key_splits > kMaxPrefillKeySplits ||
      (key_splits > 1 &&
       (scores != nullptr || batch.workspace == nullptr ||
        batch.workspace_bytes < PrefillWorkspaceBytes(shape, batch.total_rows, key_splits)))) {
    return KernelStatus::kInvalidArgument;
  }
  const dim3 grid(static_cast<unsigned>(TilesPerSpan(shape, max_rows_per_span)),
                  static_cast<unsigned>(batch.num_spans), static_cast<unsigned>(key_splits));
  const PrefillParams params{shape, batch, scores, max_blocks, key_splits};
  auto* cuda_stream = static_cast<gpuStream_t>(stream);
  if (scores != nullptr) {
    return shape.key_dtype == KeyDtype::kBf16
               ? Launch<KeyDtype::kBf16, true>(params, grid, cuda_stream)
               : Launch<KeyDtype::kFp8E4m3, true>(params, grid, cuda_stream);
  }
  return shape.key_dtype == KeyDtype::kBf16
             ? Launch<KeyDtype::kBf16, false>(params, grid, cuda_stream)
             : Launch<KeyDtype::kFp8E4m3, false>(params, grid, cuda_stream);
}

}  // namespace

int32_t PrefillKeySplits(const DeviceInfo& device, const SelectionShape& shape, int32_t num_spans,
                         int32_t max_rows_per_span, int32_t max_visible_blocks) {
  // Split only while the CTAs stay within one wave of two per
  // multiprocessor (what fits by shared memory): a split that adds a wave
  // costs more than it balances (measured on H100). At least
  // kMinBlocksPerKeySplit blocks per CTA keep the merge cheap.
  constexpr int32_t kMinBlocksPerKeySplit = 16;
  const int64_t ctas = TilesPerSpan(shape, max_rows_per_span) * num_spans;
  const int64_t wanted = 2 * int64_t{device.multiprocessors} / ctas;
  const int64_t most = max_visible_blocks / kMinBlocksPerKeySplit;
  const int64_t splits = wanted < most ? wanted : most;
  return static_cast<int32_t>(splits < 1                      ? 1
                              : splits > kMaxPrefillKeySplits ? kMaxPrefillKeySplits
                                                              : splits);
}

int64_t PrefillWorkspaceBytes(const SelectionShape& shape, int32_t total_rows, int32_t key_splits) {
  if (key_splits <= 1) return 0;
  return static_cast<int64_t>(key_splits) * total_rows * shape.num_heads * shape.topk * 8;
}

KernelStatus LaunchPrefill(const SelectionShape& shape, const DeviceBatch& batch,
                           int32_t max_rows_per_span, int32_t key_splits, void* stream) {
  return LaunchTiles(shape, batch, max_rows_per_span, key_splits, nullptr, 0, stream);
}

KernelStatus LaunchBlockScores(const SelectionShape& shape, const DeviceBatch& batch,
                               int32_t max_rows_per_span, float* scores, int32_t max_blocks,
                               void* stream) {
  if (scores == nullptr || max_blocks < 1) return KernelStatus::kInvalidArgument;
  return LaunchTiles(shape, batch, max_rows_per_span, /*key_splits=*/1, scores, max_blocks, stream);
}

}  // namespace blocksel::gpu
