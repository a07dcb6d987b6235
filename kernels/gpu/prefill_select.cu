// Prefill selection: many query rows per sequence.
//
// One CTA takes a tile of kPrefillTileQueries queries (row-major (row,
// head) pairs of one sequence, so all H heads of a row share the tile) and
// walks the key pages of its chunk. Each warp scores 16 queries against the
// page's 128 keys with bf16 matrix instructions, fp32 accumulate: on sm_90a
// its share of its warpgroup's wgmma tile, read from a swizzled page;
// elsewhere mma.sync m16n8k16 from a padded page. fp8 keys are widened to
// bf16 exactly. Each query's causal block max is folded into its top-k
// list in shared memory. Pages are staged with asynchronous copies, the
// next one in flight while the current one is scored. No score tensor is
// written. Grid: (tiles of the longest span, spans, key chunks).
//
// Key split: the longest row's blocks are cut into key_splits equal chunks;
// a tile takes one CTA per chunk it sees, so short causal tiles take few.
// Each writes its sorted partial list to the workspace and
// PrefillMergeKernel merges a tile's lists per (row, head). Every block
// lands in exactly one partial list with the priority the unsplit kernel
// gives it, so the merge is exact.
#include <algorithm>
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"
#include "kernels/gpu/wgmma_tile.cuh"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
// Each warp scores 16 queries of the tile: on sm_90a its share of its
// warpgroup's m64 tile, elsewhere one mma.sync m-tile.
static_assert(kPrefillTileQueries == 16 * (kThreads / kGroupLanes), "tile");

// CTAs resident per multiprocessor (what the registers allow at 128 per
// thread): while one waits on its matrix instructions the other stages and
// folds. The key split fills this many per multiprocessor.
constexpr int kCtasPerMultiprocessor = 2;
// Pages in the shared-memory ring: the one being scored and the next, in
// flight. Two CTAs of two pages each fit in shared memory up to head dim
// 256; measured, one CTA with a deeper ring was slower (bench/RESULTS.md).
constexpr int kStages = 2;

// Shared memory of one CTA, the same on the host (launch size, the check at
// startup) and the device: kStages staged pages, the widened page (fp8),
// the top-k lists, and room to align the pages for the swizzle.
struct PrefillShared {
  int page_stride;
  int widened_offset;
  int lists_offset;
  int bytes;
};

__host__ __device__ constexpr int RoundUp(int value, int unit) {
  return (value + unit - 1) / unit * unit;
}

__host__ __device__ constexpr PrefillShared PrefillSharedLayout(KeyDtype dtype, int head_dim,
                                                                int topk, bool lists) {
  // Either bf16 layout fits a slot: the host does not know which one the
  // device's code uses.
  const int bf16_page = RoundUp(StagedPageBytes<KeyDtype::kBf16>(head_dim), kSwizzleAlignment);
  const int page_stride =
      dtype == KeyDtype::kBf16
          ? bf16_page
          : RoundUp(StagedPageBytes<KeyDtype::kFp8E4m3>(head_dim), kSwizzleAlignment);
  const int widened_offset = kStages * page_stride;
  const int lists_offset = widened_offset + (dtype == KeyDtype::kBf16 ? 0 : bf16_page);
  const int list_bytes = lists ? kPrefillTileQueries * topk * 8 : 0;
  return {page_stride, widened_offset, lists_offset, lists_offset + list_bytes + kSwizzleAlignment};
}

struct PrefillParams {
  SelectionShape shape;
  DeviceBatch batch;
  float* scores;               // score mode: [H][total_rows][max_blocks]
  int32_t max_blocks;          // score mode: the scores tensor's last dimension
  int32_t key_splits;          // gridDim.z; > 1 only in top-k mode
  int32_t max_visible_blocks;  // sizes the chunks of a key split
};

// Blocks per chunk of a tile that sees tile_blocks: the longest row's
// share, or more for a batch with longer rows than planned, so key_splits
// chunks always cover the tile.
__device__ __forceinline__ int32_t ChunkBlocks(const PrefillParams& params, int32_t tile_blocks) {
  const int32_t planned = (params.max_visible_blocks + params.key_splits - 1) / params.key_splits;
  const int32_t needed = (tile_blocks + params.key_splits - 1) / params.key_splits;
  return max(1, max(planned, needed));
}

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
__global__ void __launch_bounds__(kThreads, kCtasPerMultiprocessor)
    PrefillKernel(PrefillParams params) {
#if defined(BLOCKSEL_GPU_WGMMA)
  constexpr bool kWgmma = WgmmaTakes(kKSteps);
#else
  constexpr bool kWgmma = false;
#endif
  constexpr StagedLayout kLayout = kWgmma ? StagedLayout::kSwizzled : StagedLayout::kPadded;
  constexpr StagedLayout kStagedLayout =
      kDtype == KeyDtype::kBf16 ? kLayout : StagedLayout::kPadded;
  constexpr int kHeadDim = 16 * kKSteps;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const DeviceSpan span = batch.spans[blockIdx.y];
  const int32_t heads = shape.num_heads;
  const int32_t topk = shape.topk;
  const int32_t num_queries = span.num_rows * heads;
  // Longest tiles first: the causal tail of a span starts early, and the
  // short tiles fill the multiprocessors it leaves.
  const int32_t tile = static_cast<int32_t>(gridDim.x - 1 - blockIdx.x);
  const int32_t tile_first = tile * kPrefillTileQueries;
  if (tile_first >= num_queries) return;
  const int32_t tile_queries = min(kPrefillTileQueries, num_queries - tile_first);
  const int32_t num_blocks = TileBlocks(span.first_position, span.num_rows, heads, tile);
  // This CTA's chunk of the tile's blocks (all of them without a split).
  const int32_t chunk = ChunkBlocks(params, num_blocks);
  const int32_t first_block = static_cast<int32_t>(blockIdx.z) * chunk;
  const int32_t end_block = min(first_block + chunk, num_blocks);
  // Chunks past the tile's blocks write no list; the merge reads only
  // those the tile sees (chunk 0 always writes).
  if (blockIdx.z > 0 && first_block >= num_blocks) return;
  // With a key split, the merge kernel is scheduled early and waits for
  // this grid on the device.
  AllowDependentLaunch();

  const PrefillShared layout = PrefillSharedLayout(kDtype, kHeadDim, topk, !kWriteScores);
  unsigned char* shared = AlignForSwizzle(shared_raw);
  unsigned char* staged[kStages];
#pragma unroll
  for (int s = 0; s < kStages; ++s) staged[s] = shared + s * layout.page_stride;
  // fp8 only: the current page widened to bf16.
  unsigned char* widened = shared + layout.widened_offset;
  float* list_scores = reinterpret_cast<float*>(shared + layout.lists_offset);
  int32_t* list_ids = reinterpret_cast<int32_t*>(list_scores + kPrefillTileQueries * topk);
  for (int i = threadIdx.x; i < kPrefillTileQueries * topk && !kWriteScores; i += kThreads) {
    list_scores[i] = -__int_as_float(0x7f800000);
    list_ids[i] = kNoBlock;
  }

  const int warp = threadIdx.x / kGroupLanes;
  const int lane = threadIdx.x % kGroupLanes;
  // This lane's queries (rows lane/4 and lane/4 + 8 of the warp's 16) and
  // their positions.
  uint32_t a[1][kKSteps][4];
  int32_t queries[1][2];
  int32_t positions[1][2];
  LoadQueryFragments<kKSteps>(
      batch.queries + static_cast<int64_t>(span.first_row) * heads * kHeadDim,
      tile_first + 16 * warp, num_queries, kHeadDim, a[0]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    queries[0][h] = tile_first + 16 * warp + lane / 4 + 8 * h;
    positions[0][h] = span.first_position + queries[0][h] / heads;
  }
  constexpr int64_t page_bytes = int64_t{kBlockSize} * kHeadDim * kKeyBytes<kDtype>;
  auto table_entry = [&](int32_t block) {
    return block < end_block ? batch.block_table[span.table_offset + block] : 0;
  };
  // One copy group per page, an empty one past the chunk's end, so page i
  // is always group i of the CTA's copies.
  auto stage = [&](int32_t block, int32_t entry, int slot) {
    if (block < end_block) {
      StagePage<kDtype, kStagedLayout, kHeadDim, kThreads>(
          static_cast<const char*>(batch.key_pool) + static_cast<int64_t>(entry) * page_bytes,
          staged[slot]);
    } else {
      CommitEmptyStage();
    }
  };
  // Every query of the tile sees the pages before this one whole: all but
  // the diagonal pages skip the causal mask.
  const int32_t first_masked_block = (span.first_position + tile_first / heads + 1) / kBlockSize;
  // The inserting lane's list: its filled entries, and once it is full its
  // last entry, the one a candidate must beat, kept in registers so that
  // most pages cost no shared-memory read.
  int32_t list_filled = 0;
  float gate_score = -__int_as_float(0x7f800000);
  int32_t gate_id = kNoBlock;
  // Folds a page's block maxima (best[h] for row lane/4 + 8h of the warp)
  // into this lane's query's list or score row. Every lane of a quad holds
  // both rows' maxima: lane 4j takes row j, lane 4j + 1 row j + 8, so two
  // lanes per quad insert at once.
  auto take = [&](int32_t block, const float(&best)[2]) {
    if (lane % 4 >= 2) return;
    const bool upper = lane % 4 == 1;
    const int32_t query = upper ? queries[0][1] : queries[0][0];
    const int32_t position = upper ? positions[0][1] : positions[0][0];
    const float block_max = upper ? best[1] : best[0];
    const bool visible = block * kBlockSize <= position;
    if (query >= num_queries) return;
    if constexpr (kWriteScores) {
      if (block < params.max_blocks) {
        params.scores[ScoreIndex(params, query, span, heads) + block] =
            visible ? block_max : -__int_as_float(0x7f800000);
      }
    } else if (visible) {
      const float priority = BlockPriority(block_max, block, VisibleBlocks(position),
                                           shape.init_blocks, shape.local_blocks);
      if (list_filled == topk && !RanksBefore(priority, block, gate_score, gate_id)) return;
      float* scores = list_scores + (query - tile_first) * topk;
      int32_t* ids = list_ids + (query - tile_first) * topk;
      InsertCandidate(scores, ids, topk, list_filled, priority, block);
      list_filled += list_filled < topk ? 1 : 0;
      if (list_filled == topk) {
        gate_score = scores[topk - 1];
        gate_id = ids[topk - 1];
      }
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) stage(first_block + s, table_entry(first_block + s), s);
  // The block table entry of the next page to stage, read a page early so
  // that staging never waits on it.
  int32_t next_entry = table_entry(first_block + kStages - 1);
  for (int32_t block = first_block; block < end_block; ++block) {
    const int buffer = (block - first_block) % kStages;
    // The barrier in the wait also tells that every thread is done with
    // the previous page, whose slot takes the page kStages - 1 ahead.
    WaitStagedPages<kStages - 2, kWgmma && kDtype == KeyDtype::kBf16>();
    stage(block + kStages - 1, next_entry, (buffer + kStages - 1) % kStages);
    next_entry = table_entry(block + kStages);
    const int32_t block_start = block * kBlockSize;
    float best[1][2];
    const unsigned char* keys = staged[buffer];
    if constexpr (kDtype == KeyDtype::kFp8E4m3) {
      WidenStagedFp8<kLayout, kHeadDim, kThreads>(keys, widened);
      if constexpr (kWgmma) FenceSharedForAsyncProxy();
      __syncthreads();
      keys = widened;
    }
    const bool unmasked = block < first_masked_block;
#if defined(BLOCKSEL_GPU_WGMMA)
    if constexpr (kWgmma) {
      float scores[kWgmmaAccumulators];
      WgmmaIssuePage<kKSteps>(a[0], keys, scores);
      WgmmaWaitScores(scores);
      const int32_t first_key = block_start + (lane % 4) * 2;
      if (unmasked) {
        FoldPageMax<false>(scores, first_key, positions[0], best[0]);
      } else {
        FoldPageMax<true>(scores, first_key, positions[0], best[0]);
      }
    } else
#endif
    {
      if (unmasked) {
        ScoreStagedTiles<kKSteps, 1, false>(a, keys, 0, kBlockSize / 8, block_start, positions,
                                            best);
      } else {
        ScoreStagedTiles<kKSteps, 1, true>(a, keys, 0, kBlockSize / 8, block_start, positions,
                                           best);
      }
    }
    take(block, best[0]);
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

// One thread per (row, head) of a span (blockIdx.y): a k-way merge of the
// sorted partial lists of the chunks its tile sees into the final ids.
__global__ void __launch_bounds__(kMergeThreads) PrefillMergeKernel(PrefillParams params) {
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const DeviceSpan span = batch.spans[blockIdx.y];
  const int32_t heads = shape.num_heads;
  const int32_t in_span = static_cast<int32_t>(blockIdx.x * kMergeThreads + threadIdx.x);
  if (in_span >= span.num_rows * heads) return;
  const int32_t topk = shape.topk;
  const int32_t row = span.first_row + in_span / heads;
  const int32_t head = in_span % heads;
  const int64_t query = static_cast<int64_t>(row) * heads + head;
  const int32_t tile_blocks =
      TileBlocks(span.first_position, span.num_rows, heads, in_span / kPrefillTileQueries);
  const int32_t chunk = ChunkBlocks(params, tile_blocks);
  const int32_t chunks = max(1, (tile_blocks + chunk - 1) / chunk);
  int32_t* out = batch.block_ids + (static_cast<int64_t>(head) * batch.total_rows + row) * topk;
  WaitForPriorGrid();  // the partial lists
  const SplitLists lists =
      CarveSplitLists(batch.workspace, shape, batch.total_rows, params.key_splits);
  const int64_t split_stride = static_cast<int64_t>(batch.total_rows) * heads * topk;
  int32_t taken[kMaxPrefillKeySplits] = {};
  for (int32_t rank = 0; rank < topk; ++rank) {
    float best_score = -__int_as_float(0x7f800000);
    int32_t best_id = kNoBlock;
    int32_t best_split = 0;
    for (int32_t split = 0; split < chunks; ++split) {
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
KernelStatus Launch(const PrefillParams& params, dim3 grid, int32_t max_rows_per_span,
                    gpuStream_t stream) {
  const int64_t shared =
      PrefillSharedLayout(kDtype, params.shape.head_dim, params.shape.topk, !kWriteScores).bytes;
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
  // Fails on a device offering less (SupportsShapeOn checks it at startup).
  if (gpuFuncSetMaxDynamicSharedMemory(kernel, shared) != gpuSuccess) {
    return KernelStatus::kUnsupported;
  }
  kernel<<<grid, kThreads, shared, stream>>>(params);
  if (gpuGetLastError() != gpuSuccess) return KernelStatus::kDeviceError;
  if (params.key_splits == 1) return KernelStatus::kOk;
  const int64_t queries = int64_t{max_rows_per_span} * params.shape.num_heads;
  return LaunchDependent(
             PrefillMergeKernel,
             dim3(static_cast<unsigned>((queries + kMergeThreads - 1) / kMergeThreads), grid.y),
             dim3(kMergeThreads), 0, stream, params) == gpuSuccess
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

KernelStatus LaunchTiles(const SelectionShape& shape, const DeviceBatch& batch,
                         int32_t max_rows_per_span, int32_t max_visible_blocks, int32_t key_splits,
                         float* scores, int32_t max_blocks, void* stream) {
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
  const dim3 grid(static_cast<unsigned>(TilesPerSpan(max_rows_per_span, shape.num_heads)),
                  static_cast<unsigned>(batch.num_spans), static_cast<unsigned>(key_splits));
  const PrefillParams params{shape,      batch,
                             scores,     max_blocks,
                             key_splits, max_visible_blocks < 1 ? 1 : max_visible_blocks};
  auto* cuda_stream = static_cast<gpuStream_t>(stream);
  if (scores != nullptr) {
    return shape.key_dtype == KeyDtype::kBf16
               ? Launch<KeyDtype::kBf16, true>(params, grid, max_rows_per_span, cuda_stream)
               : Launch<KeyDtype::kFp8E4m3, true>(params, grid, max_rows_per_span, cuda_stream);
  }
  return shape.key_dtype == KeyDtype::kBf16
             ? Launch<KeyDtype::kBf16, false>(params, grid, max_rows_per_span, cuda_stream)
             : Launch<KeyDtype::kFp8E4m3, false>(params, grid, max_rows_per_span, cuda_stream);
}

}  // namespace

int32_t PrefillKeySplits(const DeviceInfo& device, const BatchDims& dims) {
  // Split only while the tiles leave resident CTA slots empty, counting
  // tiles by their work: a causal span's tiles see from one block to all
  // of them, so they keep the device as busy as half as many tiles of the
  // longest would (the work of all tiles over that of the longest). A
  // split beyond that pays each chunk's start (its queries, the ring's
  // first pages, its list) for no balance, and measured slower on every
  // causal shape. At least kMinBlocksPerChunk blocks per chunk keep the
  // merge cheap.
  constexpr int64_t kMinBlocksPerChunk = 16;
  const int64_t resident = int64_t{kCtasPerMultiprocessor} * device.multiprocessors;
  const int64_t full_tiles =
      dims.max_visible_blocks > 0
          ? (dims.prefill_tile_blocks + dims.max_visible_blocks - 1) / dims.max_visible_blocks
          : 0;
  const int64_t wanted = full_tiles > 0 ? resident / full_tiles : 1;
  const int64_t most = dims.max_visible_blocks / kMinBlocksPerChunk;
  return static_cast<int32_t>(std::clamp<int64_t>(std::min(wanted, most), 1, kMaxPrefillKeySplits));
}

int64_t PrefillSharedBytes(const SelectionShape& shape) {
  return PrefillSharedLayout(shape.key_dtype, shape.head_dim, shape.topk, /*lists=*/true).bytes;
}

int64_t PrefillWorkspaceBytes(const SelectionShape& shape, int32_t total_rows, int32_t key_splits) {
  if (key_splits <= 1) return 0;
  return static_cast<int64_t>(key_splits) * total_rows * shape.num_heads * shape.topk * 8;
}

KernelStatus LaunchPrefill(const SelectionShape& shape, const DeviceBatch& batch,
                           int32_t max_rows_per_span, int32_t max_visible_blocks,
                           int32_t key_splits, void* stream) {
  return LaunchTiles(shape, batch, max_rows_per_span, max_visible_blocks, key_splits, nullptr, 0,
                     stream);
}

KernelStatus LaunchBlockScores(const SelectionShape& shape, const DeviceBatch& batch,
                               int32_t max_rows_per_span, float* scores, int32_t max_blocks,
                               void* stream) {
  if (scores == nullptr || max_blocks < 1) return KernelStatus::kInvalidArgument;
  return LaunchTiles(shape, batch, max_rows_per_span, max_blocks, /*key_splits=*/1, scores,
                     max_blocks, stream);
}

}  // namespace blocksel::gpu
