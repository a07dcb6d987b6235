// Decode selection: few query rows per sequence, long contexts.
//
// Launch 1 (DecodeScoreKernel): the visible key blocks of the whole batch,
// counted on the device, are split evenly over a fixed number of CTAs, so
// the grid never depends on sequence lengths (graph capture) and mixed
// lengths stay balanced. A CTA's range crosses one or more sequences; for
// each such segment it scores every page once against all H x Q queries of
// the sequence and keeps a partial top-k per query, written to the
// workspace at slot (cta + sequence), a slot no other segment uses.
// Launch 2 (DecodeMergeKernel): one CTA per (sequence, query) merges the
// partial lists of the CTAs that covered it and writes the block ids. On
// sm_90 it is a programmatic dependent launch, so it is scheduled while the
// score kernel runs and waits for it on the device.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kLaneGroups = kThreads / kGroupLanes;

struct DecodeParams {
  SelectionShape shape;
  DeviceBatch batch;
  int32_t max_queries;  // max rows per span * H: the workspace's list stride
  int32_t splits;
};

// Workspace layout: [num_spans + 1] block prefix, then per slot (splits +
// num_spans slots) max_queries lists of topk scores, then the same of ids.
struct Workspace {
  int32_t* prefix;
  float* scores;
  int32_t* ids;
};

__host__ __device__ inline int64_t ListEntries(int32_t splits, int32_t num_spans,
                                               int32_t max_queries, int32_t topk) {
  return static_cast<int64_t>(splits + num_spans) * max_queries * topk;
}

__host__ __device__ inline Workspace CarveWorkspace(void* base, int32_t splits, int32_t num_spans,
                                                    int32_t max_queries, int32_t topk) {
  Workspace w;
  w.prefix = static_cast<int32_t*>(base);
  const int64_t prefix_bytes = ((static_cast<int64_t>(num_spans) + 1) * 4 + 255) / 256 * 256;
  w.scores = reinterpret_cast<float*>(static_cast<char*>(base) + prefix_bytes);
  w.ids = reinterpret_cast<int32_t*>(w.scores + ListEntries(splits, num_spans, max_queries, topk));
  return w;
}

__device__ inline int32_t VisibleBlocks(const DeviceSpan& span) {
  const int32_t last = span.first_position + span.num_rows - 1;
  return last < 0 ? 0 : last / kBlockSize + 1;
}

// Exclusive prefix of the spans' visible blocks into prefix[0..num_spans];
// every thread of the CTA takes part.
__device__ void BlockPrefix(const DeviceSpan* spans, int32_t num_spans, int32_t* prefix,
                            int32_t* partial) {
  const int per_thread = (num_spans + kThreads - 1) / kThreads;
  const int begin = threadIdx.x * per_thread;
  int32_t sum = 0;
  for (int s = begin; s < begin + per_thread && s < num_spans; ++s) sum += VisibleBlocks(spans[s]);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int offset = 1; offset < kThreads; offset *= 2) {
    const int32_t add = threadIdx.x >= offset ? partial[threadIdx.x - offset] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  int32_t running = partial[threadIdx.x] - sum;  // exclusive
  for (int s = begin; s < begin + per_thread && s < num_spans; ++s) {
    prefix[s] = running;
    running += VisibleBlocks(spans[s]);
  }
  if (threadIdx.x == kThreads - 1) prefix[num_spans] = partial[kThreads - 1];
  __syncthreads();
}

// First block index of CTA `cta` when total blocks are split over splits.
__host__ __device__ inline int64_t SplitStart(int64_t total, int32_t splits, int32_t cta) {
  return total * cta / splits;
}

// CTAs that get work: every CTA while each gets at least kMinBlocksPerSplit
// blocks, fewer for short batches (fewer lists to merge, the rest exit at
// once). Derived from the device-side total, so the grid stays fixed.
constexpr int64_t kMinBlocksPerSplit = 1;
__host__ __device__ inline int32_t ActiveSplits(int64_t total, int32_t splits) {
  const int64_t wanted = (total + kMinBlocksPerSplit - 1) / kMinBlocksPerSplit;
  return static_cast<int32_t>(wanted < splits ? (wanted < 1 ? 1 : wanted) : splits);
}

template <KeyDtype kDtype, int kKSteps>
__global__ void __launch_bounds__(kThreads) DecodeScoreKernel(DecodeParams params) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const int32_t num_spans = batch.num_spans;
  const int32_t dim = shape.head_dim;
  const int32_t heads = shape.num_heads;
  const int32_t topk = shape.topk;

  unsigned char* staged[2] = {shared_raw, shared_raw + StagedPageBytes<kDtype>(dim)};
  // fp8 only: the current page widened to bf16.
  unsigned char* widened = shared_raw + 2 * StagedPageBytes<kDtype>(dim);
  int32_t* prefix = reinterpret_cast<int32_t*>(widened + WidenedBytes<kDtype>(dim));
  int32_t* partial = prefix + num_spans + 1;                        // kThreads
  float* group_max = reinterpret_cast<float*>(partial + kThreads);  // kLaneGroups * 16
  float* list_scores = group_max + kLaneGroups * 16;                // max_queries * topk
  int32_t* list_ids = reinterpret_cast<int32_t*>(list_scores + params.max_queries * topk);

  // The merge kernel may be scheduled now: it waits for this grid to
  // finish before reading the workspace, and its launch latency overlaps
  // the scoring.
  AllowDependentLaunch();
  BlockPrefix(batch.spans, num_spans, prefix, partial);
  const Workspace workspace =
      CarveWorkspace(batch.workspace, params.splits, num_spans, params.max_queries, topk);
  if (blockIdx.x == 0) {
    for (int s = threadIdx.x; s <= num_spans; s += kThreads) workspace.prefix[s] = prefix[s];
  }
  const int64_t total = prefix[num_spans];
  const int32_t splits = ActiveSplits(total, params.splits);
  if (static_cast<int32_t>(blockIdx.x) >= splits) return;
  const int64_t begin = SplitStart(total, splits, blockIdx.x);
  const int64_t end = SplitStart(total, splits, blockIdx.x + 1);
  if (begin >= end) return;

  // The span holding block `begin`: the last s with prefix[s] <= begin.
  int32_t low = 0, high = num_spans - 1;
  while (low < high) {
    const int32_t mid = (low + high + 1) / 2;
    if (prefix[mid] <= begin)
      low = mid;
    else
      high = mid - 1;
  }

  const int lane_group = threadIdx.x / kGroupLanes;
  const int lane = threadIdx.x % kGroupLanes;
  const int64_t page_bytes = static_cast<int64_t>(kBlockSize) * dim * kKeyBytes<kDtype>;
  const void* key_pool = batch.key_pool_ref != nullptr ? *batch.key_pool_ref : batch.key_pool;

  for (int32_t s = low; s < num_spans && prefix[s] < end; ++s) {
    const DeviceSpan span = batch.spans[s];
    const int32_t first_block =
        static_cast<int32_t>((begin > prefix[s] ? begin : prefix[s]) - prefix[s]);
    const int32_t end_block =
        static_cast<int32_t>((end < prefix[s + 1] ? end : prefix[s + 1]) - prefix[s]);
    if (first_block >= end_block) continue;
    const int32_t num_queries = span.num_rows * heads;
    // Query groups of 16 (1, 2 or 4); the lane groups share the 16 key
    // tiles of a page: lane group g scores query group g % groups against
    // tiles [sub * tiles_each, (sub + 1) * tiles_each), sub = g / groups.
    const int groups = num_queries <= 16 ? 1 : num_queries <= 32 ? 2 : 4;
    const int query_group = lane_group % groups;
    const int tiles_each = (kBlockSize / 8) / (kLaneGroups / groups);
    const int first_tile = (lane_group / groups) * tiles_each;
    uint32_t a[1][kKSteps][4];
    LoadQueryFragments<kKSteps>(batch.queries + static_cast<int64_t>(span.first_row) * heads * dim,
                                query_group * 16, num_queries, dim, a[0]);
    const int32_t query_top = query_group * 16 + lane / 4;
    const int32_t positions[1][2] = {
        {span.first_position + min(query_top, num_queries - 1) / heads,
         span.first_position + min(query_top + 8, num_queries - 1) / heads}};
    for (int i = threadIdx.x; i < num_queries * topk; i += kThreads) {
      list_scores[i] = -__int_as_float(0x7f800000);
      list_ids[i] = kNoBlock;
    }

    auto page = [&](int32_t block) {
      return static_cast<const char*>(key_pool) +
             static_cast<int64_t>(batch.block_table[span.table_offset + block]) * page_bytes;
    };
    StagePage<kDtype>(page(first_block), staged[0], dim, kThreads);
    // The block table entry of the page after next is read one iteration
    // early, so the copy of each page starts without waiting on that load.
    const char* next_page = first_block + 1 < end_block ? page(first_block + 1) : nullptr;
    for (int32_t block = first_block; block < end_block; ++block) {
      const int buffer = (block - first_block) % 2;
      if (next_page != nullptr) {
        StagePage<kDtype>(next_page, staged[1 - buffer], dim, kThreads);
        next_page = block + 2 < end_block ? page(block + 2) : nullptr;
        WaitStagedPages<1>();
      } else {
        WaitStagedPages<0>();
      }
      const int32_t block_start = block * kBlockSize;
      float best[1][2];
      const unsigned char* keys = staged[buffer];
      if constexpr (kDtype == KeyDtype::kFp8E4m3) {
        WidenStagedFp8(keys, widened, dim, kThreads);
        __syncthreads();
        keys = widened;
      }
      // Every row of the span sees a page that ends before its first row.
      if (block_start + kBlockSize - 1 <= span.first_position) {
        ScoreStagedTiles<kKSteps, 1, false>(a, keys, first_tile, first_tile + tiles_each,
                                            block_start, positions, best);
      } else {
        ScoreStagedTiles<kKSteps, 1, true>(a, keys, first_tile, first_tile + tiles_each,
                                           block_start, positions, best);
      }
      if (lane % 4 == 0) {
        group_max[lane_group * 16 + lane / 4] = best[0][0];
        group_max[lane_group * 16 + lane / 4 + 8] = best[0][1];
      }
      __syncthreads();
      for (int q = threadIdx.x; q < num_queries; q += kThreads) {
        const int32_t position = span.first_position + q / heads;
        if (block_start > position) continue;  // not visible to this row
        float score = -__int_as_float(0x7f800000);
        for (int g = q / 16; g < kLaneGroups; g += groups) {
          score = fmaxf(score, group_max[g * 16 + q % 16]);
        }
        InsertCandidate(list_scores + q * topk, list_ids + q * topk, topk,
                        BlockPriority(score, block, position / kBlockSize + 1, shape.init_blocks,
                                      shape.local_blocks),
                        block);
      }
      // The next iteration stages into this page's buffer and rewrites
      // group_max only after its own wait-and-synchronize.
    }
    __syncthreads();
    // This segment's lists go to slot (cta + span).
    const int64_t slot = static_cast<int64_t>(blockIdx.x) + s;
    for (int i = threadIdx.x; i < num_queries * topk; i += kThreads) {
      const int64_t index = slot * params.max_queries * topk + i;
      workspace.scores[index] = list_scores[i];
      workspace.ids[index] = list_ids[i];
    }
    __syncthreads();
  }
}

// Most partial lists one merge covers: splits are limited to this.
constexpr int kMaxLists = 384;
constexpr int kMergeThreads = 128;

// One CTA per (sequence, query): every partial list of the CTAs that
// covered the sequence is copied to shared memory in one parallel pass (so
// the merge rounds wait on no global load), then one warp merges them.
__global__ void __launch_bounds__(kMergeThreads) DecodeMergeKernel(DecodeParams params) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ int32_t first_list_cta;
  __shared__ int32_t last_list_cta;
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const int32_t s = blockIdx.x;
  const int32_t q = blockIdx.y;
  const int32_t topk = shape.topk;
  const DeviceSpan span = batch.spans[s];
  const int32_t num_queries = span.num_rows * shape.num_heads;
  if (q >= num_queries) return;
  const int32_t row = q / shape.num_heads;
  const int32_t head = q % shape.num_heads;
  int32_t* out = batch.block_ids +
                 (static_cast<int64_t>(head) * batch.total_rows + span.first_row + row) * topk;
  WaitForPriorGrid();  // the score kernel's lists and prefix
  const Workspace workspace =
      CarveWorkspace(batch.workspace, params.splits, batch.num_spans, params.max_queries, topk);
  const int64_t total = workspace.prefix[batch.num_spans];
  const int64_t span_begin = workspace.prefix[s];
  const int64_t span_end = workspace.prefix[s + 1];
  if (span_end == span_begin) {  // padding: no visible block, no lists
    for (int32_t i = threadIdx.x; i < topk; i += kMergeThreads) out[i] = -1;
    return;
  }
  const int32_t splits = ActiveSplits(total, params.splits);

  // Active CTAs all have non-empty ranges, so the CTAs overlapping this
  // span form one run; each wrote a list at slot (cta + span).
  if (threadIdx.x == 0) {
    first_list_cta = splits;
    last_list_cta = -1;
  }
  __syncthreads();
  for (int32_t cta = threadIdx.x; cta < splits; cta += kMergeThreads) {
    if (SplitStart(total, splits, cta) < span_end &&
        SplitStart(total, splits, cta + 1) > span_begin) {
      atomicMin(&first_list_cta, cta);
      atomicMax(&last_list_cta, cta);
    }
  }
  __syncthreads();
  const int32_t lists = last_list_cta - first_list_cta + 1;
  float* scores = reinterpret_cast<float*>(shared_raw);  // [lists][topk]
  int32_t* ids = reinterpret_cast<int32_t*>(scores + params.splits * topk);
  int32_t* positions = ids + params.splits * topk;  // [lists]
  for (int32_t i = threadIdx.x; i < lists * topk; i += kMergeThreads) {
    const int64_t index =
        ((static_cast<int64_t>(first_list_cta + i / topk) + s) * params.max_queries + q) * topk +
        i % topk;
    scores[i] = workspace.scores[index];
    ids[i] = workspace.ids[index];
  }
  for (int32_t i = threadIdx.x; i < lists; i += kMergeThreads) positions[i] = 0;
  __syncthreads();
  if (threadIdx.x >= kWarpSize) return;

  // k-way merge of the sorted lists: each round the warp picks the best
  // head (real (score, id) pairs are unique, the segments partition the
  // blocks) and that list advances.
  const int lane = threadIdx.x;
  for (int32_t rank = 0; rank < topk; ++rank) {
    float best_score = -__int_as_float(0x7f800000);
    int32_t best_id = kNoBlock;
    int32_t best_list = -1;
    for (int32_t list = lane; list < lists; list += kWarpSize) {
      const int32_t position = positions[list];
      if (position >= topk) continue;
      const float score = scores[list * topk + position];
      const int32_t id = ids[list * topk + position];
      if (RanksBefore(score, id, best_score, best_id)) {
        best_score = score;
        best_id = id;
        best_list = list;
      }
    }
    float winner_score = best_score;
    int32_t winner_id = best_id;
    WarpBest(&winner_score, &winner_id);
    if (lane == 0) out[rank] = winner_id == kNoBlock ? -1 : winner_id;
    if (winner_id == kNoBlock) {
      for (int32_t rest = rank + 1 + lane; rest < topk; rest += kWarpSize) out[rest] = -1;
      return;
    }
    if (best_list >= 0 && best_id == winner_id) ++positions[best_list];
    SyncWarp();
  }
}

// One instantiation per head dim, so query fragments take only the
// registers the head dim needs (occupancy).
template <KeyDtype kDtype>
auto ScoreKernelFor(int32_t head_dim) -> void (*)(DecodeParams) {
  switch (head_dim) {
    case 16:
      return &DecodeScoreKernel<kDtype, 1>;
    case 32:
      return &DecodeScoreKernel<kDtype, 2>;
    case 64:
      return &DecodeScoreKernel<kDtype, 4>;
    case 128:
      return &DecodeScoreKernel<kDtype, 8>;
    default:
      return &DecodeScoreKernel<kDtype, 16>;
  }
}

int64_t MergeSharedBytes(const SelectionShape& shape, int32_t splits) {
  return static_cast<int64_t>(splits) * shape.topk * 8 + splits * 4;
}

int64_t SharedBytes(const SelectionShape& shape, int32_t num_spans, int32_t max_queries) {
  const int64_t staged = shape.key_dtype == KeyDtype::kBf16
                             ? 2 * StagedPageBytes<KeyDtype::kBf16>(shape.head_dim)
                             : 2 * StagedPageBytes<KeyDtype::kFp8E4m3>(shape.head_dim) +
                                   WidenedBytes<KeyDtype::kFp8E4m3>(shape.head_dim);
  return staged + (static_cast<int64_t>(num_spans) + 1 + kThreads) * 4 + kLaneGroups * 16 * 4 +
         static_cast<int64_t>(max_queries) * shape.topk * 8;
}

}  // namespace

bool SupportsHeadDim(int32_t head_dim) {
  return head_dim >= 16 && head_dim <= 16 * kMaxKSteps && (head_dim & (head_dim - 1)) == 0;
}

int64_t DecodeWorkspaceBytes(const SelectionShape& shape, int32_t max_spans,
                             int32_t max_rows_per_span, int32_t splits) {
  const int32_t max_queries = max_rows_per_span * shape.num_heads;
  const int64_t prefix_bytes = ((static_cast<int64_t>(max_spans) + 1) * 4 + 255) / 256 * 256;
  return prefix_bytes + ListEntries(splits, max_spans, max_queries, shape.topk) * 8;
}

int32_t DecodeSplits(const DeviceInfo& device) {
  return 2 * device.multiprocessors < kMaxLists ? 2 * device.multiprocessors : kMaxLists;
}

KernelStatus LaunchDecode(const SelectionShape& shape, const DeviceBatch& batch,
                          int32_t max_rows_per_span, int32_t splits, void* stream) {
  const int32_t max_queries = max_rows_per_span * shape.num_heads;
  if (!SupportsHeadDim(shape.head_dim) || max_queries > kMaxDecodeQueries ||
      max_rows_per_span < 1 || splits < 1 || splits > kMaxLists || batch.num_spans < 1 ||
      shape.topk > 1024) {
    return KernelStatus::kUnsupported;
  }
  DecodeParams params{shape, batch, max_queries, splits};
  const int64_t shared = SharedBytes(shape, batch.num_spans, max_queries);
  if (shared > 200 * 1024) return KernelStatus::kUnsupported;
  auto* cuda_stream = static_cast<gpuStream_t>(stream);
  void (*score_kernel)(DecodeParams) = shape.key_dtype == KeyDtype::kBf16
                                           ? ScoreKernelFor<KeyDtype::kBf16>(shape.head_dim)
                                           : ScoreKernelFor<KeyDtype::kFp8E4m3>(shape.head_dim);
  if (gpuFuncSetMaxDynamicSharedMemory(score_kernel, shared) != gpuSuccess) {
    return KernelStatus::kDeviceError;
  }
  score_kernel<<<splits, kThreads, shared, cuda_stream>>>(params);
  const int64_t merge_shared = MergeSharedBytes(shape, splits);
  if (merge_shared > 200 * 1024 ||
      gpuFuncSetMaxDynamicSharedMemory(DecodeMergeKernel, merge_shared) != gpuSuccess) {
    return KernelStatus::kUnsupported;
  }
  return LaunchDependent(DecodeMergeKernel, dim3(batch.num_spans, max_queries), dim3(kMergeThreads),
                         merge_shared, cuda_stream, params) == gpuSuccess
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

}  // namespace blocksel::gpu
