// Decode selection: few query rows per sequence, long contexts. One launch.
//
// Only blocks some row leaves unforced are read: [init_blocks, valid(last
// row) - local_blocks) of each span. With local_blocks >= 1 the page that
// holds a decode row is its local block, so a Q = 1 decode never needs a
// causal mask; the forced blocks join the selection without a key read.
//
// The scored blocks of the whole batch, counted on the device, are split
// evenly over a fixed number of CTAs, so the grid never depends on
// sequence lengths (graph capture) and mixed lengths stay balanced. A CTA
// streams the pages of its range through a ring in shared memory
// (page_ring.cuh: one bulk copy per page on sm_90, several pages in
// flight); each 32-lane group takes
// the same 16 keys of every page (eight groups cover a page) into registers
// and scores them with matrix instructions against query fragments kept in
// shared memory. One barrier per page frees its ring slot. The block maxima
// of a window of 32 pages gather in shared memory and go to the workspace,
// one order-preserving key per (query, block).
// Each CTA then adds its pages to its span's counter; the CTA that
// completes the count selects the span's rows from the keys (a warp per
// row pulls the winners out of registers, see warp_topk.cuh) with the
// forced blocks, and sets the counter back to zero for the next launch.
// Spans with no scored block are answered by CTA span % grid without
// reading a key.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"
#include "kernels/gpu/page_ring.cuh"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"
#include "kernels/gpu/warp_topk.cuh"

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

constexpr int kWarps = kThreads / kWarpSize;

struct DecodeParams {
  SelectionShape shape;
  DeviceBatch batch;
  int32_t max_queries;  // max rows per span * H: the workspace's key stride
  int32_t splits;
};

// Workspace layout: one completion counter per span (zero between
// launches), then the keys: span s's query q has its scored blocks' keys
// at keys[prefix[s] * max_queries + q * scored(s) + block - init_blocks].
__host__ __device__ inline int64_t CounterBytes(int32_t num_spans) {
  return (static_cast<int64_t>(num_spans) * 4 + 255) / 256 * 256;
}

struct Workspace {
  int32_t* counters;
  uint32_t* keys;
  int64_t key_capacity;  // entries
};

__device__ inline Workspace CarveWorkspace(const DeviceBatch& batch) {
  Workspace w;
  w.counters = static_cast<int32_t*>(batch.workspace);
  w.keys = reinterpret_cast<uint32_t*>(static_cast<char*>(batch.workspace) +
                                       CounterBytes(batch.num_spans));
  w.key_capacity = (batch.workspace_bytes - CounterBytes(batch.num_spans)) / 4;
  return w;
}

// Scored blocks of a span (DecodeScoredBlocks of its last row).
__device__ inline int32_t ScoredBlocks(const DeviceSpan& span, const SelectionShape& shape) {
  return DecodeScoredBlocks(shape, span.first_position + span.num_rows - 1);
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
  // 32-bit arithmetic while the product fits (cta <= splits <= kMaxSplits,
  // so below 4M blocks): a 64-bit division is a long subroutine on the GPU.
  if (total < (int64_t{1} << 22)) {
    return static_cast<uint32_t>(total) * static_cast<uint32_t>(cta) /
           static_cast<uint32_t>(splits);
  }
  return total * cta / splits;
}

// CTAs that get work: one per block while blocks are fewer than CTAs (the
// rest have no pages to read). Derived from the device-side total, so the
// grid stays fixed.
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

// Shared memory, carved in this order. The span selection runs when the
// CTA's pages are scored, so its scratch shares the bytes of the ring, the
// fragments and the window.
struct DecodeShared {
  unsigned char* ring;  // [stages][page bytes]
  uint4* fragments;     // [kMTiles][kKSteps][kGroupLanes]
  // [max_queries][kWindow] block maxima as OrderedKey, 0 = none yet; the
  // groups combine theirs with atomicMax (one copy, not one per group, so
  // two CTAs still fit a multiprocessor at 16 queries).
  uint32_t* window_max;
  uint32_t* store_keys;  // [StoreEntries]: winners of runs of long rows
  int32_t* store_ids;    // [StoreEntries]
  uint64_t* survivors;   // [kWarps][kWarpTopKSurvivors]: each warp's top-k scratch
  int32_t* prefix;       // [num_spans + 1]
  int32_t* partial;      // [kThreads]
};

__host__ __device__ inline int64_t FragmentBytes(int32_t m_tiles, int32_t k_steps) {
  return static_cast<int64_t>(m_tiles) * k_steps * kGroupLanes * 16;
}

__host__ __device__ inline int64_t ScoringBytes(int64_t ring_bytes, int32_t m_tiles,
                                                int32_t k_steps, int32_t max_queries) {
  return ring_bytes + FragmentBytes(m_tiles, k_steps) +
         4 * static_cast<int64_t>(max_queries) * kWindow;
}

// Entries of the store: lists of topk winners, at least three per query
// (the carried winners in, the carried winners out, one run), and room for
// a long row's runs to be taken in few rounds.
__host__ __device__ inline int64_t StoreEntries(int32_t max_queries, int32_t topk) {
  const int64_t per_query = 3 * static_cast<int64_t>(max_queries) * topk;
  return per_query > 4 * kWarpTopKRun ? per_query : 4 * kWarpTopKRun;
}

__host__ __device__ inline int64_t SelectingBytes(int32_t max_queries, int32_t topk) {
  return 8 * StoreEntries(max_queries, topk) + 8 * int64_t{kWarps} * kWarpTopKSurvivors;
}

__host__ __device__ inline int64_t DecodeSharedBytes(int64_t ring_bytes, int32_t m_tiles,
                                                     int32_t k_steps, int32_t max_queries,
                                                     int32_t topk, int32_t num_spans) {
  const int64_t scoring = ScoringBytes(ring_bytes, m_tiles, k_steps, max_queries);
  const int64_t selecting = SelectingBytes(max_queries, topk);
  return (scoring > selecting ? scoring : selecting) + 4 * (num_spans + 1 + int64_t{kThreads});
}

__device__ inline DecodeShared CarveShared(unsigned char* base, int64_t ring_bytes, int32_t m_tiles,
                                           int32_t k_steps, int32_t max_queries, int32_t topk,
                                           int32_t num_spans) {
  DecodeShared shared;
  shared.ring = base;
  shared.fragments = reinterpret_cast<uint4*>(base + ring_bytes);
  shared.window_max =
      reinterpret_cast<uint32_t*>(base + ring_bytes + FragmentBytes(m_tiles, k_steps));
  shared.store_keys = reinterpret_cast<uint32_t*>(base);
  shared.store_ids =
      reinterpret_cast<int32_t*>(shared.store_keys + StoreEntries(max_queries, topk));
  shared.survivors =
      reinterpret_cast<uint64_t*>(shared.store_ids + StoreEntries(max_queries, topk));
  const int64_t scoring = ScoringBytes(ring_bytes, m_tiles, k_steps, max_queries);
  const int64_t selecting = SelectingBytes(max_queries, topk);
  shared.prefix = reinterpret_cast<int32_t*>(base + (scoring > selecting ? scoring : selecting));
  shared.partial = shared.prefix + num_spans + 1;
  return shared;
}

// Writes the window's block maxima, pages [window, window_end) of the
// span's scored blocks, to the workspace and clears them for the next
// window. Every thread takes part.
__device__ void WriteWindow(const DecodeShared& shared, uint32_t* span_keys, int32_t scored,
                            int32_t num_queries, int32_t window, int32_t window_end) {
  const int32_t pages = window_end - window;
  for (int32_t i = threadIdx.x; i < num_queries * pages; i += kThreads) {
    const int32_t q = i / pages;
    const int32_t page = i % pages;
    span_keys[static_cast<int64_t>(q) * scored + window + page] =
        shared.window_max[q * kWindow + page];
    shared.window_max[q * kWindow + page] = 0;
  }
}

// The candidates of one row, in block order: its init blocks, the scored
// blocks (keys in the workspace), its local blocks.
struct RowCandidates {
  const uint32_t* keys;  // the row's scored keys, block init_blocks first
  int32_t init_blocks;
  int32_t init_end;     // forced init blocks [0, init_end)
  int32_t local_start;  // forced local blocks [local_start, count)
  int32_t count;        // visible blocks, 0 for padding

  // Written by other CTAs of this launch: read from L2, never from a stale
  // L1 line.
  __device__ uint32_t KeyOf(int32_t block) const {
    if (block < init_end) return OrderedKey(kInitPriority);
    if (block >= local_start) return OrderedKey(kLocalPriority);
    return LoadCoherent(keys + block - init_blocks);
  }
};

__device__ inline RowCandidates CandidatesOf(const SelectionShape& shape, int32_t position,
                                             const uint32_t* keys) {
  RowCandidates row;
  row.keys = keys;
  row.init_blocks = shape.init_blocks;
  row.count = VisibleBlocks(position);
  row.local_start = row.count > shape.local_blocks ? row.count - shape.local_blocks : 0;
  row.init_end = shape.init_blocks < row.local_start ? shape.init_blocks : row.local_start;
  return row;
}

// Selects every row of span s from its keys and forced blocks and writes
// the block ids; every thread of the CTA takes part. When every row has at
// most kWarpTopKRun visible blocks, a warp takes a row. Longer rows are cut
// into runs of kWarpTopKRun blocks: in a round the warps share the (row,
// run) pairs and leave each run's winners in the store, then a warp per
// row selects among its carried winners and the round's lists (the last
// round into the block ids). The carried list alternates between two
// places, so a round never overwrites the list it reads.
__device__ void SelectSpan(const DecodeParams& params, const DecodeShared& shared,
                           const uint32_t* keys, int32_t s) {
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const DeviceSpan span = batch.spans[s];
  const int32_t heads = shape.num_heads;
  const int32_t topk = shape.topk;
  const int32_t num_queries = span.num_rows * heads;
  const int32_t scored = shared.prefix[s + 1] - shared.prefix[s];
  const uint32_t* span_keys = keys + static_cast<int64_t>(shared.prefix[s]) * params.max_queries;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = LaneIndex();
  uint64_t* scratch = shared.survivors + warp * kWarpTopKSurvivors;
  auto row_of = [&](int32_t q) {
    return CandidatesOf(shape, span.first_position + q / heads,
                        span_keys + static_cast<int64_t>(q) * scored);
  };
  auto out_of = [&](int32_t q) {
    return batch.block_ids +
           (static_cast<int64_t>(q % heads) * batch.total_rows + span.first_row + q / heads) * topk;
  };
  // The last row sees the most blocks.
  const int32_t longest = VisibleBlocks(span.first_position + span.num_rows - 1);
  if (longest <= kWarpTopKRun) {
    for (int32_t q = warp; q < num_queries; q += kWarps) {
      const RowCandidates row = row_of(q);
      int32_t* out = out_of(q);
      WarpTopK([&](int32_t block) { return row.KeyOf(block); }, [](int32_t i) { return i; },
               row.count, topk, [&](int32_t rank, uint32_t, int32_t id) { out[rank] = id; },
               scratch);
      const int32_t filled = row.count < topk ? row.count : topk;
      for (int32_t e = filled + lane; e < topk; e += kWarpSize) out[e] = -1;
    }
    return;
  }
  const int32_t runs = (longest + kWarpTopKRun - 1) / kWarpTopKRun;
  // Lists per query: two carried places and up to lists - 2 runs a round,
  // all of which one warp's run holds.
  const int64_t fit = StoreEntries(params.max_queries, topk) / (int64_t{num_queries} * topk);
  const int32_t lists =
      static_cast<int32_t>(fit < kWarpTopKRun / topk + 1 ? fit : kWarpTopKRun / topk + 1);
  auto list_of = [&](int32_t q, int32_t list) { return (q * lists + list) * topk; };
  for (int32_t i = threadIdx.x; i < num_queries * topk; i += kThreads) {
    shared.store_keys[list_of(i / topk, 0) + i % topk] = 0;  // no winners yet: 0 loses to all
    shared.store_ids[list_of(i / topk, 0) + i % topk] = kNoBlock;
  }
  int32_t carried = 0;  // where the carried winners are: list 0 or 1
  for (int32_t first_run = 0; first_run < runs; first_run += lists - 2) {
    const int32_t round_runs = runs - first_run < lists - 2 ? runs - first_run : lists - 2;
    for (int32_t task = warp; task < num_queries * round_runs; task += kWarps) {
      const int32_t q = task / round_runs;
      const int32_t run_begin = (first_run + task % round_runs) * kWarpTopKRun;
      const RowCandidates row = row_of(q);
      const int32_t left = row.count - run_begin;
      const int32_t run_count = left < 0 ? 0 : left < kWarpTopKRun ? left : kWarpTopKRun;
      const int32_t list = list_of(q, 2 + task % round_runs);
      WarpTopK([&](int32_t i) { return row.KeyOf(run_begin + i); },
               [&](int32_t i) { return run_begin + i; }, run_count, topk,
               [&](int32_t rank, uint32_t key, int32_t id) {
                 shared.store_keys[list + rank] = key;
                 shared.store_ids[list + rank] = id;
               },
               scratch);
      for (int32_t e = (run_count < topk ? run_count : topk) + lane; e < topk; e += kWarpSize) {
        shared.store_keys[list + e] = 0;
        shared.store_ids[list + e] = kNoBlock;
      }
    }
    __syncthreads();  // the round's lists are in the store
    const bool last_round = first_run + round_runs >= runs;
    for (int32_t q = warp; q < num_queries; q += kWarps) {
      // Candidate i: the carried list first (the lowest blocks), then the
      // round's runs in block order.
      auto place = [&](int32_t i) {
        const int32_t list = i / topk == 0 ? carried : 1 + i / topk;
        return list_of(q, list) + i % topk;
      };
      const int32_t next = list_of(q, 1 - carried);
      int32_t* out = out_of(q);
      WarpTopK([&](int32_t i) { return shared.store_keys[place(i)]; },
               [&](int32_t i) { return shared.store_ids[place(i)]; }, (1 + round_runs) * topk, topk,
               [&](int32_t rank, uint32_t key, int32_t id) {
                 if (last_round) {
                   out[rank] = id == kNoBlock ? -1 : id;
                 } else {
                   shared.store_keys[next + rank] = key;
                   shared.store_ids[next + rank] = id;
                 }
               },
               scratch);
    }
    carried = 1 - carried;
    __syncthreads();  // the carried list is in place; the runs' lists are free
  }
}

template <KeyDtype kDtype, int kHeadDim, int kMTiles>
__global__ void __launch_bounds__(kThreads, 2) DecodeKernel(DecodeParams params) {
  using Layout = KeyFragments<kDtype, kHeadDim>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ int32_t completes_span;
  const SelectionShape& shape = params.shape;
  const DeviceBatch& batch = params.batch;
  const int32_t num_spans = batch.num_spans;
  const int32_t heads = shape.num_heads;
  const int32_t topk = shape.topk;
  constexpr int64_t kRowBytes = static_cast<int64_t>(kHeadDim) * kKeyBytes<kDtype>;
  constexpr int64_t kPageBytes = kBlockSize * kRowBytes;
  constexpr int64_t kRingBytes = static_cast<int64_t>(kRingStages<kDtype, kHeadDim>) * kPageBytes;
  const DecodeShared shared = CarveShared(shared_raw, kRingBytes, kMTiles, Layout::kKSteps,
                                          params.max_queries, topk, num_spans);
  constexpr int kStages = kRingStages<kDtype, kHeadDim>;
  __shared__ uint64_t ring_full[kStages];
  const PageRing<kStages, static_cast<int>(kPageBytes), kThreads> ring{shared.ring, ring_full};
  ring.Init();  // ScoredPrefix's barriers publish it

  ScoredPrefix(batch.spans, num_spans, shape, shared.prefix, shared.partial);
  const int32_t* prefix = shared.prefix;
  const Workspace workspace = CarveWorkspace(batch);
  const int64_t total = prefix[num_spans];
  if (total * params.max_queries > workspace.key_capacity) {
    // A workspace too small for the batch (DecodeWorkspaceBytes sizes it):
    // nothing is read or written but -1 rows.
    for (int32_t s = blockIdx.x; s < num_spans; s += gridDim.x) {
      const DeviceSpan span = batch.spans[s];
      for (int32_t i = threadIdx.x; i < span.num_rows * heads * topk; i += kThreads) {
        const int32_t q = i / topk;
        batch.block_ids[(static_cast<int64_t>(q % heads) * batch.total_rows + span.first_row +
                         q / heads) *
                            topk +
                        i % topk] = -1;
      }
    }
    return;
  }
  const int32_t splits = ActiveSplits(total, params.splits);
  const int64_t begin =
      static_cast<int32_t>(blockIdx.x) < splits ? SplitStart(total, splits, blockIdx.x) : 0;
  const int64_t end =
      static_cast<int32_t>(blockIdx.x) < splits ? SplitStart(total, splits, blockIdx.x + 1) : 0;

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

  uint32_t ring_seq = 0;  // pages this CTA has staged
  for (int32_t s = low; begin < end && s < num_spans && prefix[s] < end; ++s) {
    const DeviceSpan span = batch.spans[s];
    const int32_t scored = prefix[s + 1] - prefix[s];
    // This segment: the span's scored blocks [first, end_page), counted
    // from init_blocks.
    const int32_t first = static_cast<int32_t>((begin > prefix[s] ? begin : prefix[s]) - prefix[s]);
    const int32_t end_page =
        static_cast<int32_t>((end < prefix[s + 1] ? end : prefix[s + 1]) - prefix[s]);
    if (first >= end_page) continue;
    const int32_t* table = batch.block_table + span.table_offset + shape.init_blocks;
    uint32_t* span_keys = workspace.keys + static_cast<int64_t>(prefix[s]) * params.max_queries;
    auto page_of = [&](int32_t page_index) {
      return key_pool + static_cast<int64_t>(page_index) * kPageBytes;
    };
    // Ring sequence numbers of this segment's pages.
    const uint32_t first_seq = ring_seq;
    auto seq_of = [&](int32_t page) { return first_seq + static_cast<uint32_t>(page - first); };
    ring_seq += static_cast<uint32_t>(end_page - first);
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
        ring.Stage(page_of(prologue_pages[stage]), seq_of(first + stage));
      }
      ring.Commit();
    }
    const int32_t num_queries = span.num_rows * heads;
    StageQueryFragments<kDtype, kHeadDim, kMTiles>(
        batch.queries + static_cast<int64_t>(span.first_row) * heads * kHeadDim, num_queries,
        shared.fragments);
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
    __syncthreads();  // fragments and window are in place
    for (int32_t window = first; window < end_page; window += kWindow) {
      const int32_t window_end = window + kWindow < end_page ? window + kWindow : end_page;
      for (int32_t page = window; page < window_end; ++page) {
        // `page` is in its slot and every group is done with the slot
        // staged next (it held page - 1).
        ring.Wait(seq_of(page));
        __syncthreads();
        const int32_t staged = page + kStages - 1;
        if (staged < end_page) {
          ring.Stage(page_of(next_index), seq_of(staged));
          if (staged + 1 < end_page) next_index = table[staged + 1];
        }
        ring.Commit();
        uint4 keys[kTilesPerGroup][Layout::kLoads];
        LoadKeys<kDtype, kHeadDim>(ring.Slot(seq_of(page)) + lane_offset, keys);
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
      WriteWindow(shared, span_keys, scored, num_queries, window, window_end);
      __syncthreads();  // window_max may be rewritten
    }
    // Count this segment's pages; the CTA that completes the span's count
    // selects its rows. Every writer fences before the count is taken.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const int32_t pages = end_page - first;
      const int32_t before = atomicAdd(&workspace.counters[s], pages);
      completes_span = before + pages == scored;
      if (completes_span) {
        workspace.counters[s] = 0;  // ready for the next launch
        __threadfence();
      }
    }
    __syncthreads();
    if (completes_span) SelectSpan(params, shared, workspace.keys, s);
    __syncthreads();  // the next segment restages the ring
  }
  // Spans without a scored block (padding, or every block forced) are in
  // no CTA's range.
  for (int32_t s = blockIdx.x; s < num_spans; s += gridDim.x) {
    if (prefix[s + 1] != prefix[s]) continue;
    SelectSpan(params, shared, workspace.keys, s);
    __syncthreads();  // the store is free for the next span
  }
}

using DecodeKernelPointer = void (*)(DecodeParams);

// One instantiation per (head dim, query m-tiles), so fragments and
// accumulators take only the registers the shape needs.
template <KeyDtype kDtype, int kMTiles>
DecodeKernelPointer DecodeKernelFor(int32_t head_dim) {
  switch (head_dim) {
    case 16:
      return &DecodeKernel<kDtype, 16, kMTiles>;
    case 32:
      return &DecodeKernel<kDtype, 32, kMTiles>;
    case 64:
      return &DecodeKernel<kDtype, 64, kMTiles>;
    case 128:
      return &DecodeKernel<kDtype, 128, kMTiles>;
    default:
      return &DecodeKernel<kDtype, 256, kMTiles>;
  }
}

template <KeyDtype kDtype>
DecodeKernelPointer DecodeKernelFor(int32_t head_dim, int32_t m_tiles) {
  return m_tiles == 1   ? DecodeKernelFor<kDtype, 1>(head_dim)
         : m_tiles == 2 ? DecodeKernelFor<kDtype, 2>(head_dim)
                        : DecodeKernelFor<kDtype, 4>(head_dim);
}

int32_t KSteps(const SelectionShape& shape) {
  return PermutedKSteps(16 / KeyDtypeBytes(shape.key_dtype), shape.head_dim);
}

int32_t MTiles(int32_t max_queries) {
  const int32_t needed = (max_queries + 15) / 16;
  return needed <= 2 ? needed : 4;
}

constexpr int64_t kMaxSharedBytes = 200 * 1024;
// The most CTAs: SplitStart's 32-bit path needs splits * blocks < 2^32.
constexpr int32_t kMaxSplits = 1024;

}  // namespace

int64_t DecodeWorkspaceBytes(const SelectionShape& shape, int32_t max_spans,
                             int32_t max_rows_per_span, int64_t max_scored_blocks) {
  return CounterBytes(max_spans) +
         4 * max_scored_blocks * max_rows_per_span * static_cast<int64_t>(shape.num_heads);
}

int32_t DecodeSplits(const DeviceInfo& device) {
  return 2 * device.multiprocessors < kMaxSplits ? 2 * device.multiprocessors : kMaxSplits;
}

KernelStatus LaunchDecode(const SelectionShape& shape, const DeviceBatch& batch,
                          int32_t max_rows_per_span, int32_t splits, void* stream) {
  const int32_t max_queries = max_rows_per_span * shape.num_heads;
  if (!SupportsShape(shape, nullptr) || max_queries > kKernelLimits.max_decode_queries ||
      max_rows_per_span < 1 || splits < 1 || splits > kMaxSplits || batch.num_spans < 1 ||
      shape.topk > kKernelLimits.max_decode_topk) {
    return KernelStatus::kUnsupported;
  }
  if (batch.workspace == nullptr || batch.workspace_bytes < CounterBytes(batch.num_spans)) {
    return KernelStatus::kInvalidArgument;
  }
  const DecodeParams params{shape, batch, max_queries, splits};
  const int32_t m_tiles = MTiles(max_queries);
  const int32_t page_bytes = kBlockSize * shape.head_dim * KeyDtypeBytes(shape.key_dtype);
  const int64_t shared =
      DecodeSharedBytes(static_cast<int64_t>(RingStages(page_bytes)) * page_bytes, m_tiles,
                        KSteps(shape), max_queries, shape.topk, batch.num_spans);
  if (shared > kMaxSharedBytes) return KernelStatus::kUnsupported;
  const DecodeKernelPointer kernel =
      shape.key_dtype == KeyDtype::kBf16
          ? DecodeKernelFor<KeyDtype::kBf16>(shape.head_dim, m_tiles)
          : DecodeKernelFor<KeyDtype::kFp8E4m3>(shape.head_dim, m_tiles);
  if (gpuFuncSetMaxDynamicSharedMemory(kernel, shared) != gpuSuccess) {
    return KernelStatus::kDeviceError;
  }
  kernel<<<splits, kThreads, shared, static_cast<gpuStream_t>(stream)>>>(params);
  return gpuGetLastError() == gpuSuccess ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

}  // namespace blocksel::gpu
