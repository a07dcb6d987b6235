// Decode selection: few query rows per sequence, long contexts.
//
// Only blocks some row leaves unforced are read: [init_blocks, valid(last
// row) - local_blocks) of each span. With local_blocks >= 1 the page that
// holds a decode row is its local block, so a Q = 1 decode never needs a
// causal mask; the forced blocks join at the merge without a key read.
//
// Launch 1 (DecodeScoreKernel): the scored blocks of the whole batch,
// counted on the device, are split evenly over a fixed number of CTAs, so
// the grid never depends on sequence lengths (graph capture) and mixed
// lengths stay balanced. A CTA streams the pages of its range through a
// ring in shared memory (asynchronous copies, several pages in flight);
// each 32-lane group takes the same 16 keys of every page (eight groups
// cover a page) into registers and scores them with matrix instructions
// against query fragments kept in shared memory. One barrier per page
// frees its ring slot. The block maxima of a window of 32 pages gather in
// shared memory; then each query's window is folded into its running top-k
// (two more barriers per window). Each segment's lists (one span's part of
// the range) go to the workspace at slot (cta + span), a slot no other
// segment uses.
// Launch 2 (DecodeMergeKernel): one CTA per (span, query) merges the lists
// of the CTAs that covered the span with the row's forced blocks and writes
// the block ids. On sm_90 it is a programmatic dependent launch: scheduled
// as the score kernel's CTAs finish, it waits for it on the device.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"

#if defined(BLOCKSEL_GPU_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kGroups = kThreads / kGroupLanes;
constexpr int kKeysPerGroup = kBlockSize / kGroups;
constexpr int kTilesPerGroup = kKeysPerGroup / 8;
// Pages whose block maxima gather before a top-k fold; one per lane of the
// folding group.
constexpr int kWindow = kGroupLanes;

struct DecodeParams {
  SelectionShape shape;
  DeviceBatch batch;
  int32_t max_queries;  // max rows per span * H: the workspace's list stride
  int32_t splits;
};

// Workspace layout: [num_spans + 1] scored-block prefix, then per slot
// (splits + num_spans slots) max_queries lists of topk scores, then the
// same of ids.
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

// Blocks of the span that some row scores: [init_blocks, init_blocks + n).
// Blocks past them are local (or invisible) for every row of the span.
__device__ inline int32_t ScoredBlocks(const DeviceSpan& span, const SelectionShape& shape) {
  const int32_t last = span.first_position + span.num_rows - 1;
  if (last < 0) return 0;
  const int32_t scored_end = VisibleBlocks(last) - shape.local_blocks;
  return scored_end > shape.init_blocks ? scored_end - shape.init_blocks : 0;
}

// Exclusive prefix of the spans' scored blocks into prefix[0..num_spans];
// every thread of the CTA takes part.
__device__ void ScoredPrefix(const DeviceSpan* spans, int32_t num_spans,
                             const SelectionShape& shape, int32_t* prefix, int32_t* partial) {
  const int per_thread = (num_spans + kThreads - 1) / kThreads;
  const int begin = threadIdx.x * per_thread;
  int32_t sum = 0;
  for (int s = begin; s < begin + per_thread && s < num_spans; ++s) {
    sum += ScoredBlocks(spans[s], shape);
  }
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
    running += ScoredBlocks(spans[s], shape);
  }
  if (threadIdx.x == kThreads - 1) prefix[num_spans] = partial[kThreads - 1];
  __syncthreads();
}

// First block index of CTA `cta` when total blocks are split over splits.
__host__ __device__ inline int64_t SplitStart(int64_t total, int32_t splits, int32_t cta) {
  // 32-bit arithmetic while the product fits (cta <= splits < 512, so below
  // 4M blocks): a 64-bit division is a long subroutine on the GPU.
  if (total < (int64_t{1} << 22)) {
    return static_cast<uint32_t>(total) * static_cast<uint32_t>(cta) /
           static_cast<uint32_t>(splits);
  }
  return total * cta / splits;
}

// CTAs that get work: one per block while blocks are fewer than CTAs (fewer
// lists to merge; the rest exit at once). Derived from the device-side
// total, so the grid stays fixed.
__host__ __device__ inline int32_t ActiveSplits(int64_t total, int32_t splits) {
  return static_cast<int32_t>(total < splits ? (total < 1 ? 1 : total) : splits);
}

// How a lane holds keys in registers. A lane loads 16 contiguous bytes at a
// time and the 4 lanes of a quad cover 64 contiguous bytes of one key, so
// every load instruction reads whole 32-byte sectors. The m16n8k16
// fragment wants quad lane c to hold k = 2c, 2c+1, 2c+8, 2c+9 of each
// 16-element k step. A dot product does not depend on the order of its
// terms, so each k step is made of the elements the lanes happen to hold
// (a fixed permutation of the head dim) and the query fragments are built
// with the same permutation: lane c's unit u is the 8 elements from
// UnitElement(u, c); k step 2u takes its first 4, step 2u + 1 the rest.
// k steps of that layout for a head dim, given the elements one 16-byte
// load holds (8 bf16, 16 fp8); the host sizes shared memory with it.
__host__ __device__ constexpr int PermutedKSteps(int elements_per_load, int head_dim) {
  return 2 * (elements_per_load / 8) *
         ((head_dim + 4 * elements_per_load - 1) / (4 * elements_per_load));
}

template <KeyDtype kDtype, int kHeadDim>
struct KeyFragments {
  static constexpr int kElementsPerLoad = 16 / kKeyBytes<kDtype>;
  static constexpr int kUnitsPerLoad = kElementsPerLoad / 8;
  static constexpr int kQuadElements = 4 * kElementsPerLoad;
  // Loads per key per lane; lanes whose elements lie past the head dim
  // (head dims below a quad's span) hold zeros.
  static constexpr int kLoads = (kHeadDim + kQuadElements - 1) / kQuadElements;
  static constexpr int kKSteps = PermutedKSteps(kElementsPerLoad, kHeadDim);

  __host__ __device__ static constexpr int UnitElement(int unit, int quad_lane) {
    return (unit / kUnitsPerLoad) * kQuadElements + quad_lane * kElementsPerLoad +
           (unit % kUnitsPerLoad) * 8;
  }
};

// Two e4m3 bytes (low byte first) widened exactly to two packed bf16: every
// e4m3 value, NaN included, is a bf16 value.
__device__ __forceinline__ uint32_t WidenFp8Pair(uint32_t two_bytes) {
#if defined(BLOCKSEL_GPU_CUDA)
  const __half2_raw halves =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  const __nv_bfloat162 packed = __float22bfloat162_rn(__half22float2(__half2(halves)));
  return *reinterpret_cast<const uint32_t*>(&packed);
#else
  return (__float_as_uint(Fp8BitsToFloat(two_bytes & 0xFFu)) >> 16) |
         (__float_as_uint(Fp8BitsToFloat((two_bytes >> 8) & 0xFFu)) & 0xFFFF0000u);
#endif
}

// The bf16 pairs of one 16-byte load: words[v] are unit v's four pairs.
template <KeyDtype kDtype>
__device__ __forceinline__ void UnpackLoad(const uint4& raw,
                                           uint32_t (&words)[16 / kKeyBytes<kDtype> / 8][4]) {
  if constexpr (kDtype == KeyDtype::kBf16) {
    words[0][0] = raw.x;
    words[0][1] = raw.y;
    words[0][2] = raw.z;
    words[0][3] = raw.w;
  } else {
    const uint32_t source[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      words[i / 4][i % 4] = WidenFp8Pair(source[i / 2] >> (16 * (i % 2)));
    }
  }
}

// Query fragments of a span's [num_queries][head_dim] queries, permuted as
// KeyFragments says, into fragments[(m * kKSteps + step) * kGroupLanes +
// lane] (queries past num_queries are zero). Every thread takes part.
template <KeyDtype kDtype, int kHeadDim, int kMTiles>
__device__ void StageQueryFragments(const uint16_t* queries, int32_t num_queries,
                                    uint4* fragments) {
  using Layout = KeyFragments<kDtype, kHeadDim>;
  constexpr int kEntries = kMTiles * Layout::kKSteps * kGroupLanes;
  for (int i = threadIdx.x; i < kEntries; i += kThreads) {
    const int lane = i % kGroupLanes;
    const int step = (i / kGroupLanes) % Layout::kKSteps;
    const int32_t first_query = 16 * (i / (kGroupLanes * Layout::kKSteps)) + lane / 4;
    const int element = Layout::UnitElement(step / 2, lane % 4) + 4 * (step % 2);
    auto pair = [&](int32_t query, int offset) -> uint32_t {
      return query < num_queries && element < kHeadDim
                 ? *reinterpret_cast<const uint32_t*>(
                       queries + static_cast<int64_t>(query) * kHeadDim + element + offset)
                 : 0u;
    };
    fragments[i] = make_uint4(pair(first_query, 0), pair(first_query + 8, 0), pair(first_query, 2),
                              pair(first_query + 8, 2));
  }
}

// Pages in flight per CTA: a ring of staged pages in about 96 KiB of shared
// memory, so two CTAs fit a multiprocessor with six pages in flight
// between them (what keeps the H200's memory busy; one page each was
// latency bound).
__host__ __device__ constexpr int RingStages(int page_bytes) {
  return 96 * 1024 / page_bytes < 2 ? 2 : 96 * 1024 / page_bytes > 6 ? 6 : 96 * 1024 / page_bytes;
}
template <KeyDtype kDtype, int kHeadDim>
inline constexpr int kRingStages = RingStages(kBlockSize* kHeadDim* kKeyBytes<kDtype>);

// Starts copying one page (contiguous in the pool) into a ring slot; every
// thread of the CTA calls it, then CommitStage.
template <KeyDtype kDtype, int kHeadDim>
__device__ __forceinline__ void StageRawPage(const char* page, unsigned char* slot) {
  constexpr int kChunks = kBlockSize * kHeadDim * kKeyBytes<kDtype> / 16;
  for (int chunk = threadIdx.x; chunk < kChunks; chunk += kThreads) {
#if defined(BLOCKSEL_GPU_MMA)
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(slot + chunk * 16));
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(address),
                 "l"(page + chunk * 16));
#else
    *reinterpret_cast<uint4*>(slot + chunk * 16) = LoadStreaming(page + chunk * 16);
#endif
  }
}

// One commit group per ring stage (empty groups keep the count uniform).
__device__ __forceinline__ void CommitStage() {
#if defined(BLOCKSEL_GPU_MMA)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// This lane's keys of a staged page: tile t, load l at keys[t][l].
template <KeyDtype kDtype, int kHeadDim>
__device__ __forceinline__ void LoadKeys(
    const unsigned char* lane_page,
    uint4 (&keys)[kTilesPerGroup][KeyFragments<kDtype, kHeadDim>::kLoads]) {
  using Layout = KeyFragments<kDtype, kHeadDim>;
  constexpr int kRowBytes = kHeadDim * kKeyBytes<kDtype>;
  const int quad_lane = threadIdx.x % 4;
#pragma unroll
  for (int t = 0; t < kTilesPerGroup; ++t) {
#pragma unroll
    for (int l = 0; l < Layout::kLoads; ++l) {
      const bool inside =
          l * Layout::kQuadElements + quad_lane * Layout::kElementsPerLoad < kHeadDim;
      keys[t][l] = inside ? *reinterpret_cast<const uint4*>(lane_page + t * 8 * kRowBytes + l * 64)
                          : make_uint4(0, 0, 0, 0);
    }
  }
}

// Scores this lane's keys against kMTiles x 16 queries. Returns in
// best[m][h] the max over the group's 16 keys visible to query row lane/4 +
// 8h of m-tile m (at positions[m][h]), reduced over the quad; NaN scores
// count -1e30. kMasked = false: every query sees every key.
template <KeyDtype kDtype, int kHeadDim, int kMTiles, bool kMasked>
__device__ __forceinline__ void ScoreKeys(
    const uint4 (&keys)[kTilesPerGroup][KeyFragments<kDtype, kHeadDim>::kLoads],
    const uint4* fragments, int32_t first_key_position, const int32_t (&positions)[kMTiles][2],
    float (&best)[kMTiles][2]) {
  using Layout = KeyFragments<kDtype, kHeadDim>;
  const int lane = threadIdx.x % kGroupLanes;
  float acc[kTilesPerGroup][kMTiles][4] = {};
#pragma unroll
  for (int l = 0; l < Layout::kLoads; ++l) {
    uint32_t words[kTilesPerGroup][Layout::kUnitsPerLoad][4];
#pragma unroll
    for (int t = 0; t < kTilesPerGroup; ++t) UnpackLoad<kDtype>(keys[t][l], words[t]);
#pragma unroll
    for (int v = 0; v < Layout::kUnitsPerLoad; ++v) {
      const int step = 2 * (l * Layout::kUnitsPerLoad + v);
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        const uint4 first = fragments[(m * Layout::kKSteps + step) * kGroupLanes + lane];
        const uint4 second = fragments[(m * Layout::kKSteps + step + 1) * kGroupLanes + lane];
        const uint32_t a0[4] = {first.x, first.y, first.z, first.w};
        const uint32_t a1[4] = {second.x, second.y, second.z, second.w};
#pragma unroll
        for (int t = 0; t < kTilesPerGroup; ++t) {
          MultiplyAccumulate(a0, words[t][v], acc[t][m]);
          MultiplyAccumulate(a1, words[t][v] + 2, acc[t][m]);
        }
      }
    }
  }
  // acc[t][m][h * 2 + c]: query row lane/4 + 8h of m-tile m against key
  // t * 8 + 2 * (lane % 4) + c of the group's keys.
  bool saw_nan[kMTiles][2] = {};
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) best[m][0] = best[m][1] = -__int_as_float(0x7f800000);
#pragma unroll
  for (int t = 0; t < kTilesPerGroup; ++t) {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      FoldTileMax<kMTiles, kMasked>(acc[t][m], m, first_key_position + t * 8 + 2 * (lane % 4),
                                    positions, best, saw_nan);
    }
  }
  FinishQuadMax(best, saw_nan);
}

// Shared memory of the score kernel, carved in this order.
struct ScoreShared {
  unsigned char* ring;  // [stages][page bytes]
  uint4* fragments;     // [kMTiles][kKSteps][kGroupLanes]
  // [max_queries][kWindow] block maxima as OrderedKey, 0 = none yet; the
  // groups combine theirs with atomicMax (one copy, not one per group, so
  // two CTAs still fit a multiprocessor at 16 queries).
  uint32_t* window_max;
  float* list_scores;   // [max_queries][topk]
  int32_t* list_ids;    // [max_queries][topk]
  float* fold_scores;   // [kGroups][kWindow]
  int32_t* fold_flags;  // [kGroups][kWindow]
  int32_t* prefix;      // [num_spans + 1]
  int32_t* partial;     // [kThreads]
};

__host__ __device__ inline int64_t FragmentBytes(int32_t m_tiles, int32_t k_steps) {
  return static_cast<int64_t>(m_tiles) * k_steps * kGroupLanes * 16;
}

__host__ __device__ inline int64_t ScoreSharedBytes(int64_t ring_bytes, int32_t m_tiles,
                                                    int32_t k_steps, int32_t max_queries,
                                                    int32_t topk, int32_t num_spans) {
  return ring_bytes + FragmentBytes(m_tiles, k_steps) +
         4 * (static_cast<int64_t>(max_queries) * kWindow +
              2 * static_cast<int64_t>(max_queries) * topk + 2 * kGroups * kWindow + num_spans + 1 +
              kThreads);
}

__device__ inline ScoreShared CarveShared(unsigned char* base, int64_t ring_bytes, int32_t m_tiles,
                                          int32_t k_steps, int32_t max_queries, int32_t topk,
                                          int32_t num_spans) {
  ScoreShared shared;
  shared.ring = base;
  base += ring_bytes;
  shared.fragments = reinterpret_cast<uint4*>(base);
  shared.window_max = reinterpret_cast<uint32_t*>(base + FragmentBytes(m_tiles, k_steps));
  shared.list_scores = reinterpret_cast<float*>(shared.window_max + max_queries * kWindow);
  shared.list_ids = reinterpret_cast<int32_t*>(shared.list_scores + max_queries * topk);
  shared.fold_scores = reinterpret_cast<float*>(shared.list_ids + max_queries * topk);
  shared.fold_flags = reinterpret_cast<int32_t*>(shared.fold_scores + kGroups * kWindow);
  shared.prefix = shared.fold_flags + kGroups * kWindow;
  shared.partial = shared.prefix + num_spans + 1;
  return shared;
}

// Folds query q's window of block maxima (pages [window, window_end) of
// the span's scored blocks) into its running list; one group per query.
// Lane i stages page window + i; then lane 0 inserts the pages that beat
// the list's last entry.
__device__ void FoldWindow(const ScoreShared& shared, const SelectionShape& shape, int32_t q,
                           int32_t position, int32_t window, int32_t window_end) {
  const int group = threadIdx.x / kGroupLanes;
  const int lane = threadIdx.x % kGroupLanes;
  const int32_t topk = shape.topk;
  float* list_scores = shared.list_scores + q * topk;
  int32_t* list_ids = shared.list_ids + q * topk;
  const int32_t page = window + lane;
  const int32_t block = shape.init_blocks + page;
  // Scored for this row: visible and not one of its local blocks.
  bool candidate =
      page < window_end && position >= 0 && block < VisibleBlocks(position) - shape.local_blocks;
  float score = -__int_as_float(0x7f800000);
  if (candidate) {
    score = FromOrderedKey(shared.window_max[q * kWindow + lane]);
    candidate = RanksBefore(score, block, list_scores[topk - 1], list_ids[topk - 1]);
  }
  shared.window_max[q * kWindow + lane] = 0;  // ready for the next window
  shared.fold_scores[group * kWindow + lane] = score;
  shared.fold_flags[group * kWindow + lane] = candidate ? 1 : 0;
  SyncWarp();
  if (lane == 0) {
    for (int i = 0; i < window_end - window; ++i) {
      if (shared.fold_flags[group * kWindow + i] == 0) continue;
      InsertCandidate(list_scores, list_ids, topk, shared.fold_scores[group * kWindow + i],
                      shape.init_blocks + window + i);
    }
  }
  SyncWarp();
}

template <KeyDtype kDtype, int kHeadDim, int kMTiles>
__global__ void __launch_bounds__(kThreads, 2) DecodeScoreKernel(DecodeParams params) {
  using Layout = KeyFragments<kDtype, kHeadDim>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const int32_t num_spans = batch.num_spans;
  const int32_t heads = shape.num_heads;
  const int32_t topk = shape.topk;
  constexpr int64_t kRowBytes = static_cast<int64_t>(kHeadDim) * kKeyBytes<kDtype>;
  constexpr int64_t kPageBytes = kBlockSize * kRowBytes;
  const ScoreShared shared =
      CarveShared(shared_raw, static_cast<int64_t>(kRingStages<kDtype, kHeadDim>) * kPageBytes,
                  kMTiles, Layout::kKSteps, params.max_queries, topk, num_spans);

  ScoredPrefix(batch.spans, num_spans, shape, shared.prefix, shared.partial);
  const int32_t* prefix = shared.prefix;
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

  const int group = threadIdx.x / kGroupLanes;
  const int lane = threadIdx.x % kGroupLanes;
  const int64_t lane_offset = (group * kKeysPerGroup + lane / 4) * kRowBytes + (lane % 4) * 16;
  const char* key_pool = static_cast<const char*>(
      batch.key_pool_ref != nullptr ? *batch.key_pool_ref : batch.key_pool);

  for (int32_t s = low; s < num_spans && prefix[s] < end; ++s) {
    const DeviceSpan span = batch.spans[s];
    // This segment: the span's scored blocks [first, end_page), counted
    // from init_blocks.
    const int32_t first = static_cast<int32_t>((begin > prefix[s] ? begin : prefix[s]) - prefix[s]);
    const int32_t end_page =
        static_cast<int32_t>((end < prefix[s + 1] ? end : prefix[s + 1]) - prefix[s]);
    if (first >= end_page) continue;
    const int32_t* table = batch.block_table + span.table_offset + shape.init_blocks;
    auto page_of = [&](int32_t page_index) {
      return key_pool + static_cast<int64_t>(page_index) * kPageBytes;
    };
    constexpr int kStages = kRingStages<kDtype, kHeadDim>;
    // Ring prologue, before the queries are staged so that their loads
    // overlap: pages first .. first + kStages - 2 in flight. The table
    // entry of the next page to stage is read one page early, so no copy
    // waits on a table load.
    int32_t prologue_pages[kStages - 1];
#pragma unroll
    for (int stage = 0; stage < kStages - 1; ++stage) {
      prologue_pages[stage] = first + stage < end_page ? table[first + stage] : 0;
    }
#pragma unroll
    for (int stage = 0; stage < kStages - 1; ++stage) {
      if (first + stage < end_page) {
        StageRawPage<kDtype, kHeadDim>(page_of(prologue_pages[stage]),
                                       shared.ring + ((first + stage) % kStages) * kPageBytes);
      }
      CommitStage();
    }
    const int32_t num_queries = span.num_rows * heads;
    StageQueryFragments<kDtype, kHeadDim, kMTiles>(
        batch.queries + static_cast<int64_t>(span.first_row) * heads * kHeadDim, num_queries,
        shared.fragments);
    for (int i = threadIdx.x; i < num_queries * topk; i += kThreads) {
      shared.list_scores[i] = -__int_as_float(0x7f800000);
      shared.list_ids[i] = kNoBlock;
    }
    for (int i = threadIdx.x; i < num_queries * kWindow; i += kThreads) shared.window_max[i] = 0;
    int32_t positions[kMTiles][2];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int32_t q = 16 * m + lane / 4 + 8 * h;
        positions[m][h] = span.first_position + (q < num_queries ? q : num_queries - 1) / heads;
      }
    }
    int32_t next_index = first + kStages - 1 < end_page ? table[first + kStages - 1] : 0;
    __syncthreads();  // fragments and lists are in place
    for (int32_t window = first; window < end_page; window += kWindow) {
      const int32_t window_end = window + kWindow < end_page ? window + kWindow : end_page;
      for (int32_t page = window; page < window_end; ++page) {
        // Every thread's copies of `page` are complete and every group is
        // done with the slot staged next (it held page - 1).
        WaitStagedPages<kStages - 2>();
        const int32_t staged = page + kStages - 1;
        if (staged < end_page) {
          StageRawPage<kDtype, kHeadDim>(page_of(next_index),
                                         shared.ring + (staged % kStages) * kPageBytes);
          if (staged + 1 < end_page) next_index = table[staged + 1];
        }
        CommitStage();
        uint4 keys[kTilesPerGroup][Layout::kLoads];
        LoadKeys<kDtype, kHeadDim>(shared.ring + (page % kStages) * kPageBytes + lane_offset, keys);
        const int32_t block_start = (shape.init_blocks + page) * kBlockSize;
        const int32_t first_key_position = block_start + group * kKeysPerGroup;
        float best[kMTiles][2];
        if (block_start + kBlockSize - 1 <= span.first_position) {
          ScoreKeys<kDtype, kHeadDim, kMTiles, false>(keys, shared.fragments, first_key_position,
                                                      positions, best);
        } else {
          ScoreKeys<kDtype, kHeadDim, kMTiles, true>(keys, shared.fragments, first_key_position,
                                                     positions, best);
        }
        if (lane % 4 == 0) {
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int32_t q = 16 * m + lane / 4 + 8 * h;
              if (q < num_queries) {
                atomicMax(&shared.window_max[q * kWindow + page - window], OrderedKey(best[m][h]));
              }
            }
          }
        }
      }
      __syncthreads();  // the window's maxima are complete
      for (int32_t q = group; q < num_queries; q += kGroups) {
        FoldWindow(shared, shape, q, span.first_position + q / heads, window, window_end);
      }
      __syncthreads();  // lists updated; window_max may be rewritten
    }
    // This segment's lists go to slot (cta + span).
    const int64_t slot = static_cast<int64_t>(blockIdx.x) + s;
    for (int i = threadIdx.x; i < num_queries * topk; i += kThreads) {
      const int64_t index = slot * params.max_queries * topk + i;
      workspace.scores[index] = shared.list_scores[i];
      workspace.ids[index] = shared.list_ids[i];
    }
    __syncthreads();  // the next segment restages fragments and lists
  }
  // The merge kernel may be scheduled once every CTA got here (or exited):
  // its launch latency overlaps the last CTAs' work, and it never takes a
  // multiprocessor a score CTA still needs.
  AllowDependentLaunch();
}

// Most partial lists one merge covers: splits are limited to this.
constexpr int kMaxLists = 384;
constexpr int kMergeThreads = 256;

// Entries of `list` (topk long, sorted best first) that rank before
// (score, id); with or_equal, also those equal to it. Binary search.
__device__ __forceinline__ int32_t CountBefore(const float* list_scores, const int32_t* list_ids,
                                               int32_t topk, float score, int32_t id,
                                               bool or_equal) {
  int32_t low = 0, high = topk;  // the answer lies in [low, high]
  while (low < high) {
    const int32_t mid = (low + high) / 2;
    const bool before = or_equal ? !RanksBefore(score, id, list_scores[mid], list_ids[mid])
                                 : RanksBefore(list_scores[mid], list_ids[mid], score, id);
    if (before) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return low;
}

// Shared bytes of the merge: two buffers of (splits + 1) lists.
__host__ __device__ inline int64_t MergeSharedBytes(int32_t topk, int32_t splits) {
  return 2 * (static_cast<int64_t>(splits) + 1) * topk * 8;
}

// One CTA per (span, query): the partial lists of the CTAs that covered the
// span and one list of the row's forced blocks are copied to shared memory,
// then merged pairwise in log2(lists) rounds. In a round every entry of a
// pair finds its rank in the merged list by a binary search in the other
// list (ties, only between empty entries, go to the first list) and lands
// there if it is among the best topk; every thread takes part, with no
// serial k-way loop.
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
  const int32_t position = span.first_position + row;
  int32_t* out = batch.block_ids +
                 (static_cast<int64_t>(head) * batch.total_rows + span.first_row + row) * topk;
  WaitForPriorGrid();  // the score kernel's lists and prefix
  if (position < 0) {  // padding
    for (int32_t i = threadIdx.x; i < topk; i += kMergeThreads) out[i] = -1;
    return;
  }
  const Workspace workspace =
      CarveWorkspace(batch.workspace, params.splits, batch.num_spans, params.max_queries, topk);
  const int64_t total = workspace.prefix[batch.num_spans];
  const int64_t span_begin = workspace.prefix[s];
  const int64_t span_end = workspace.prefix[s + 1];
  const int32_t splits = ActiveSplits(total, params.splits);

  // Active CTAs all have non-empty ranges, so the CTAs overlapping this
  // span form one run, from the CTA holding its first block to the one
  // holding its last; each wrote a list at slot (cta + span). One thread
  // finds each end (no atomics: all CTAs of a long span would contend).
  if (threadIdx.x == 0) {
    first_list_cta = 0;
    last_list_cta = -1;
  }
  __syncthreads();
  for (int32_t cta = threadIdx.x; cta < splits && span_end > span_begin; cta += kMergeThreads) {
    const int64_t cta_begin = SplitStart(total, splits, cta);
    const int64_t cta_end = SplitStart(total, splits, cta + 1);
    if (cta_begin <= span_begin && span_begin < cta_end) first_list_cta = cta;
    if (cta_begin < span_end && span_end <= cta_end) last_list_cta = cta;
  }
  __syncthreads();
  // Lists [0, scored) are the CTAs', list `scored` the forced blocks.
  const int32_t scored = last_list_cta - first_list_cta + 1;
  const int32_t capacity = (params.splits + 1) * topk;
  // Buffer b: capacity scores, then capacity ids. (Computed, not kept in a
  // pointer array: HIP's compiler cannot initialize one from shared memory.)
  float* const shared_scores = reinterpret_cast<float*>(shared_raw);
  auto scores = [&](int buffer) { return shared_scores + 2 * buffer * capacity; };
  auto ids = [&](int buffer) {
    return reinterpret_cast<int32_t*>(shared_scores + (2 * buffer + 1) * capacity);
  };
  // Loads go out kCopyBatch at a time before any is stored, so the copy
  // waits on memory once per batch, not once per entry.
  constexpr int kCopyBatch = 8;
  const int32_t entries = scored * topk;
  for (int32_t base = threadIdx.x; base < entries; base += kMergeThreads * kCopyBatch) {
    float batch_scores[kCopyBatch];
    int32_t batch_ids[kCopyBatch];
#pragma unroll
    for (int j = 0; j < kCopyBatch; ++j) {
      const int32_t i = base + j * kMergeThreads;
      if (i >= entries) continue;
      const int64_t index =
          ((static_cast<int64_t>(first_list_cta + i / topk) + s) * params.max_queries + q) * topk +
          i % topk;
      batch_scores[j] = workspace.scores[index];
      batch_ids[j] = workspace.ids[index];
    }
#pragma unroll
    for (int j = 0; j < kCopyBatch; ++j) {
      const int32_t i = base + j * kMergeThreads;
      if (i >= entries) continue;
      scores(0)[i] = batch_scores[j];
      ids(0)[i] = batch_ids[j];
    }
  }
  {
    // The forced blocks in rank order: init (1e30) then local (1e29), each
    // by ascending id; a block that is both counts as local.
    const int32_t valid = VisibleBlocks(position);
    const int32_t local_start = valid > shape.local_blocks ? valid - shape.local_blocks : 0;
    const int32_t init_end = shape.init_blocks < local_start ? shape.init_blocks : local_start;
    const int32_t forced = init_end + (valid - local_start);
    for (int32_t k = threadIdx.x; k < topk; k += kMergeThreads) {
      const bool real = k < forced;
      scores(0)[entries + k] = !real          ? -__int_as_float(0x7f800000)
                               : k < init_end ? kInitPriority
                                              : kLocalPriority;
      ids(0)[entries + k] = !real ? kNoBlock : k < init_end ? k : local_start + (k - init_end);
    }
  }
  __syncthreads();

  int32_t lists = scored + 1;
  int current = 0;
  while (lists > 1) {
    const int32_t pairs = (lists + 1) / 2;
    const float* from_scores = scores(current);
    const int32_t* from_ids = ids(current);
    for (int32_t e = threadIdx.x; e < pairs * 2 * topk; e += kMergeThreads) {
      const int32_t pair = e / (2 * topk);
      const int32_t side = (e / topk) % 2;
      const int32_t k = e % topk;
      const int32_t own = 2 * pair + side;
      if (own >= lists) continue;  // the odd list out has no partner
      const float score = from_scores[own * topk + k];
      const int32_t id = from_ids[own * topk + k];
      const int32_t other = 2 * pair + 1 - side;
      const int32_t rank =
          k + (other < lists ? CountBefore(from_scores + other * topk, from_ids + other * topk,
                                           topk, score, id, /*or_equal=*/side == 1)
                             : 0);
      if (rank < topk) {
        scores(1 - current)[pair * topk + rank] = score;
        ids(1 - current)[pair * topk + rank] = id;
      }
    }
    __syncthreads();
    current = 1 - current;
    lists = pairs;
  }
  for (int32_t k = threadIdx.x; k < topk; k += kMergeThreads) {
    const int32_t id = ids(current)[k];
    out[k] = id == kNoBlock ? -1 : id;
  }
}

using ScoreKernel = void (*)(DecodeParams);

// One instantiation per (head dim, query m-tiles), so fragments and
// accumulators take only the registers the shape needs.
template <KeyDtype kDtype, int kMTiles>
ScoreKernel ScoreKernelFor(int32_t head_dim) {
  switch (head_dim) {
    case 16:
      return &DecodeScoreKernel<kDtype, 16, kMTiles>;
    case 32:
      return &DecodeScoreKernel<kDtype, 32, kMTiles>;
    case 64:
      return &DecodeScoreKernel<kDtype, 64, kMTiles>;
    case 128:
      return &DecodeScoreKernel<kDtype, 128, kMTiles>;
    default:
      return &DecodeScoreKernel<kDtype, 256, kMTiles>;
  }
}

template <KeyDtype kDtype>
ScoreKernel ScoreKernelFor(int32_t head_dim, int32_t m_tiles) {
  return m_tiles == 1   ? ScoreKernelFor<kDtype, 1>(head_dim)
         : m_tiles == 2 ? ScoreKernelFor<kDtype, 2>(head_dim)
                        : ScoreKernelFor<kDtype, 4>(head_dim);
}

int32_t KSteps(const SelectionShape& shape) {
  return PermutedKSteps(16 / KeyDtypeBytes(shape.key_dtype), shape.head_dim);
}

int32_t MTiles(int32_t max_queries) {
  const int32_t needed = (max_queries + 15) / 16;
  return needed <= 2 ? needed : 4;
}

constexpr int64_t kMaxSharedBytes = 200 * 1024;

}  // namespace

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
  if (!SupportsShape(shape, nullptr) || max_queries > kKernelLimits.max_decode_queries ||
      max_rows_per_span < 1 || splits < 1 || splits > kMaxLists || batch.num_spans < 1 ||
      batch.num_spans > 65535 || shape.topk > kKernelLimits.max_decode_topk) {
    return KernelStatus::kUnsupported;
  }
  // The merge keeps two buffers of (splits + 1) lists in shared memory, so
  // a large topk runs on fewer CTAs (the workspace holds either).
  const int32_t merge_fit =
      static_cast<int32_t>(kMaxSharedBytes / MergeSharedBytes(shape.topk, 0)) - 1;
  const DecodeParams params{shape, batch, max_queries, splits < merge_fit ? splits : merge_fit};
  const int32_t m_tiles = MTiles(max_queries);
  const int32_t page_bytes = kBlockSize * shape.head_dim * KeyDtypeBytes(shape.key_dtype);
  const int64_t shared =
      ScoreSharedBytes(static_cast<int64_t>(RingStages(page_bytes)) * page_bytes, m_tiles,
                       KSteps(shape), max_queries, shape.topk, batch.num_spans);
  const int64_t merge_shared = MergeSharedBytes(shape.topk, params.splits);
  if (shared > kMaxSharedBytes || merge_shared > kMaxSharedBytes) {
    return KernelStatus::kUnsupported;
  }
  auto* cuda_stream = static_cast<gpuStream_t>(stream);
  const ScoreKernel score_kernel =
      shape.key_dtype == KeyDtype::kBf16
          ? ScoreKernelFor<KeyDtype::kBf16>(shape.head_dim, m_tiles)
          : ScoreKernelFor<KeyDtype::kFp8E4m3>(shape.head_dim, m_tiles);
  if (gpuFuncSetMaxDynamicSharedMemory(score_kernel, shared) != gpuSuccess ||
      gpuFuncSetMaxDynamicSharedMemory(DecodeMergeKernel, merge_shared) != gpuSuccess) {
    return KernelStatus::kDeviceError;
  }
  score_kernel<<<params.splits, kThreads, shared, cuda_stream>>>(params);
  if (gpuGetLastError() != gpuSuccess) return KernelStatus::kDeviceError;
  return LaunchDependent(DecodeMergeKernel, dim3(batch.num_spans, max_queries), dim3(kMergeThreads),
                         merge_shared, cuda_stream, params) == gpuSuccess
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

}  // namespace blocksel::gpu
