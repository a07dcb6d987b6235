// Scoring key pages with matrix instructions: the page is staged in shared
// memory with asynchronous copies, and each group of 32 lanes scores 16 or
// 32 queries against a range of 8-key tiles of it.
#ifndef BLOCKSEL_KERNELS_GPU_PAGE_TILE_CUH_
#define BLOCKSEL_KERNELS_GPU_PAGE_TILE_CUH_

#include <cstdint>
#include <utility>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/select_common.cuh"
#include "kernels/selection_types.h"

namespace blocksel::gpu {

// The m16n8k16 fragment layout works in groups of 32 lanes (an AMD
// wavefront of 64 holds two groups).
inline constexpr int kGroupLanes = 32;

#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define BLOCKSEL_GPU_MMA 1
#endif

// Bytes of one staged key row: the row plus 16 bytes of padding, so the
// fragment loads of 8 consecutive keys fall in different shared banks.
template <KeyDtype kDtype>
__host__ __device__ constexpr int StagedRowBytes(int head_dim) {
  return head_dim * kKeyBytes<kDtype> + 16;
}

template <KeyDtype kDtype>
__host__ __device__ constexpr int StagedPageBytes(int head_dim) {
  return kBlockSize * StagedRowBytes<kDtype>(head_dim);
}

// How a bf16 page sits in shared memory. kPadded: rows of head_dim
// elements plus 16 bytes, so the fragment loads of 8 consecutive keys fall
// in different banks (ldmatrix, mma.sync). kSwizzled: Hopper's 128-byte
// swizzle, which warpgroup matrix instructions read through a descriptor:
// the row is cut into 64-element panels ([kBlockSize][128 B] each, one
// after the other), and 16-byte chunk c of row r of a panel sits at chunk
// c ^ (r % 8). Head dims that are multiples of 64 only.
enum class StagedLayout { kPadded, kSwizzled };

inline constexpr int kSwizzleRowBytes = 128;
inline constexpr int kSwizzlePanelBytes = kBlockSize * kSwizzleRowBytes;

// Offset of 16-byte chunk `chunk` of bf16 key row `row` in a staged page.
template <StagedLayout kLayout>
__host__ __device__ constexpr int Bf16ChunkOffset(int row, int chunk, int head_dim) {
  if constexpr (kLayout == StagedLayout::kPadded) {
    return row * StagedRowBytes<KeyDtype::kBf16>(head_dim) + chunk * 16;
  } else {
    constexpr int kChunksPerPanelRow = kSwizzleRowBytes / 16;
    return (chunk / kChunksPerPanelRow) * kSwizzlePanelBytes + row * kSwizzleRowBytes +
           (((chunk % kChunksPerPanelRow) ^ (row % 8)) * 16);
  }
}

#if defined(BLOCKSEL_GPU_MMA)
// One asynchronous 16-byte copy, its offsets immediates.
template <int kStagedOffset, int kSourceOffset>
__device__ __forceinline__ void CopyChunkAsync(uint32_t address, const unsigned char* source) {
  asm volatile("cp.async.cg.shared.global [%0 + %2], [%1 + %3], 16;\n" ::"r"(address), "l"(source),
               "n"(kStagedOffset), "n"(kSourceOffset));
}

// Copies from source + i * kSourceStride to shared address + i *
// kStagedStride, for i in kPasses...
template <int kStagedStride, int kSourceStride, int... kPasses>
__device__ __forceinline__ void CopyChunksAsync(uint32_t address, const unsigned char* source,
                                                std::integer_sequence<int, kPasses...>) {
  (CopyChunkAsync<kPasses * kStagedStride, kPasses * kSourceStride>(address, source), ...);
}
#endif

// Starts copying one page into shared memory; every one of the CTA's
// kThreads threads calls it. Completes at WaitStagedPages. fp8 pages are
// staged padded (WidenStagedFp8 lays them out for the scoring).
//
// Each thread copies the same 16-byte column of every kRowsPerPass-th row:
// with rows a multiple of 8 apart the swizzle pattern repeats, so its
// chunks lie a constant stride apart on both sides and each copy is one
// instruction with immediate offsets from two base addresses.
template <KeyDtype kDtype, StagedLayout kLayout, int kHeadDim, int kThreads>
__device__ __forceinline__ void StagePage(const void* page, unsigned char* staged) {
  static_assert(kDtype == KeyDtype::kBf16 || kLayout == StagedLayout::kPadded,
                "fp8 pages are staged padded");
  constexpr int kRowBytes = kHeadDim * kKeyBytes<kDtype>;
  constexpr int kChunksPerRow = kRowBytes / 16;
  static_assert(kThreads % kChunksPerRow == 0, "a thread keeps its column");
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  constexpr int kPasses = (kBlockSize + kRowsPerPass - 1) / kRowsPerPass;
  constexpr bool kSwizzled = kDtype == KeyDtype::kBf16 && kLayout == StagedLayout::kSwizzled;
  static_assert(!kSwizzled || kPasses == 1 || kRowsPerPass % 8 == 0, "the swizzle repeats");
  constexpr int kStagedRowStride = kSwizzled ? kSwizzleRowBytes : StagedRowBytes<kDtype>(kHeadDim);
  const int row = static_cast<int>(threadIdx.x) / kChunksPerRow;
  const int column = static_cast<int>(threadIdx.x) % kChunksPerRow;
  if (kBlockSize % kRowsPerPass != 0 && row >= kBlockSize) return;  // fewer chunks than threads
  const unsigned char* source =
      static_cast<const unsigned char*>(page) + row * kRowBytes + column * 16;
  unsigned char* destination =
      staged + (kDtype == KeyDtype::kBf16 ? Bf16ChunkOffset<kLayout>(row, column, kHeadDim)
                                          : row * StagedRowBytes<kDtype>(kHeadDim) + column * 16);
#if defined(BLOCKSEL_GPU_MMA)
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
  CopyChunksAsync<kRowsPerPass * kStagedRowStride, kRowsPerPass * kRowBytes>(
      address, source, std::make_integer_sequence<int, kPasses>{});
  asm volatile("cp.async.commit_group;\n" ::);
#else
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    *reinterpret_cast<uint4*>(destination + pass * kRowsPerPass * kStagedRowStride) =
        *reinterpret_cast<const uint4*>(source + pass * kRowsPerPass * kRowBytes);
  }
#endif
}

// Closes a copy group holding no page, so that a ring's group count stays
// one per slot at the end of a chunk.
__device__ __forceinline__ void CommitEmptyStage() {
#if defined(BLOCKSEL_GPU_MMA)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Makes this thread's completed writes to shared memory visible to the
// async proxy (warpgroup matrix instructions read operands through it);
// the barrier that follows publishes them to the CTA.
__device__ __forceinline__ void FenceSharedForAsyncProxy() {
#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Waits until at most `pending` staged pages are still in flight, then
// synchronizes the CTA so every thread sees the completed copies
// (kForAsyncProxy: and the async proxy too).
template <int kPending, bool kForAsyncProxy = false>
__device__ __forceinline__ void WaitStagedPages() {
#if defined(BLOCKSEL_GPU_MMA)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
  if constexpr (kForAsyncProxy) FenceSharedForAsyncProxy();
  __syncthreads();
}

// fp8 pages are staged raw, then widened once per page, exactly, into a
// bf16 staging buffer of layout kLayout that the scoring reads (rather than
// each of the scoring lane groups widening its own fragments again).
template <StagedLayout kLayout, int kHeadDim, int kThreads>
__device__ __forceinline__ void WidenStagedFp8(const unsigned char* raw, unsigned char* widened) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kBlockSize * kChunksPerRow;
#pragma unroll
  for (int pass = 0; pass < (kChunks + kThreads - 1) / kThreads; ++pass) {
    const int chunk = static_cast<int>(threadIdx.x) + pass * kThreads;
    if (kChunks % kThreads != 0 && chunk >= kChunks) break;
    const int row = chunk / kChunksPerRow;
    const int column = chunk % kChunksPerRow;  // 8 elements: one bf16 chunk
    const uint2 bytes = *reinterpret_cast<const uint2*>(
        raw + row * StagedRowBytes<KeyDtype::kFp8E4m3>(kHeadDim) + column * 8);
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t source = i < 2 ? bytes.x : bytes.y;
      const uint32_t low = (source >> (16 * (i % 2))) & 0xFFu;
      const uint32_t high = (source >> (16 * (i % 2) + 8)) & 0xFFu;
      words[i] = (__float_as_uint(Fp8BitsToFloat(low)) >> 16) |
                 (__float_as_uint(Fp8BitsToFloat(high)) & 0xFFFF0000u);
    }
    *reinterpret_cast<uint4*>(widened + Bf16ChunkOffset<kLayout>(row, column, kHeadDim)) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// Two consecutive bf16 key elements of a staged row, packed.
__device__ __forceinline__ uint32_t StagedKeyPair(const unsigned char* staged, int key, int element,
                                                  int head_dim) {
  return *reinterpret_cast<const uint32_t*>(
      staged + key * StagedRowBytes<KeyDtype::kBf16>(head_dim) + element * 2);
}

#if !defined(BLOCKSEL_GPU_MMA)
__device__ __forceinline__ float LowBf16(uint32_t pair) { return Bf16BitsToFloat(pair & 0xFFFFu); }
__device__ __forceinline__ float HighBf16(uint32_t pair) { return Bf16BitsToFloat(pair >> 16); }
#endif

// acc (16 queries x 8 keys, m16n8 accumulator layout) += A * B for one
// 16-element k step; a: 4 packed query pairs, b: 2 packed key pairs.
__device__ __forceinline__ void MultiplyAccumulate(const uint32_t a[4], const uint32_t b[2],
                                                   float acc[4]) {
#if defined(BLOCKSEL_GPU_MMA)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // The same fragment layout computed lane by lane, gathering operands
  // from the group's lanes with shuffles (targets without mma.sync).
  const int lane = threadIdx.x % kGroupLanes;
  const int base = threadIdx.x % kWarpSize - lane;  // first lane of this group
  const int row = lane / 4;
  const int col = (lane % 4) * 2;
  float sums[4] = {0, 0, 0, 0};
  for (int k = 0; k < 16; ++k) {
    // A (r, k): lane r%8*4 + (k%8)/2, register (k >= 8 ? 2 : 0) + (r >= 8).
    const int owner = (k % 8) / 2;
    const int reg = k >= 8 ? 2 : 0;
    const uint32_t top = ShuffleIndex(a[reg], base + row * 4 + owner);
    const uint32_t bottom = ShuffleIndex(a[reg + 1], base + row * 4 + owner);
    const float q0 = (k % 2) ? HighBf16(top) : LowBf16(top);
    const float q1 = (k % 2) ? HighBf16(bottom) : LowBf16(bottom);
    // B (k, n): lane n*4 + (k%8)/2, register k >= 8.
    for (int c = 0; c < 2; ++c) {
      const uint32_t key = ShuffleIndex(b[k >= 8 ? 1 : 0], base + (col + c) * 4 + owner);
      const float value = (k % 2) ? HighBf16(key) : LowBf16(key);
      sums[c] = fmaf(q0, value, sums[c]);
      sums[2 + c] = fmaf(q1, value, sums[2 + c]);
    }
  }
  for (int i = 0; i < 4; ++i) acc[i] += sums[i];
#endif
}

// Loads this lane's A fragments for 16 queries starting at first_query of
// a [num_queries][head_dim] bf16 array (rows past num_queries are zero).
template <int kKSteps>
__device__ __forceinline__ void LoadQueryFragments(const uint16_t* queries, int32_t first_query,
                                                   int32_t num_queries, int head_dim,
                                                   uint32_t a[kKSteps][4]) {
  const int lane = threadIdx.x % kGroupLanes;
  const int row = lane / 4;
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int step = 0; step < kKSteps; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int32_t q = first_query + row + (r % 2) * 8;
      const int element = step * 16 + col + (r / 2) * 8;
      a[step][r] = (step * 16 < head_dim && q < num_queries)
                       ? *reinterpret_cast<const uint32_t*>(
                             queries + static_cast<int64_t>(q) * head_dim + element)
                       : 0u;
    }
  }
}

// Folds one m16n8 accumulator tile (acc[h * 2 + c]: query row lane/4 + 8h
// of m-tile m against the key at key_position + c) into best[m][h], the max
// over the keys visible to each query (at positions[m][h]). fmaxf drops NaN
// operands, so whether a visible score was NaN is kept apart in saw_nan.
// kMasked = false: every query sees every key.
template <int kMTiles, bool kMasked>
__device__ __forceinline__ void FoldTileMax(const float (&acc)[4], int m, int32_t key_position,
                                            const int32_t (&positions)[kMTiles][2],
                                            float (&best)[kMTiles][2],
                                            bool (&saw_nan)[kMTiles][2]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kMasked) {
      if (key_position + i % 2 > positions[m][i / 2]) continue;
    }
    best[m][i / 2] = fmaxf(best[m][i / 2], acc[i]);
    saw_nan[m][i / 2] |= isnan(acc[i]);
  }
}

// Completes the maxima FoldTileMax gathered: a NaN score counts -1e30
// (SEMANTICS.md), then the max over the 4 lanes that share a query.
template <int kMTiles>
__device__ __forceinline__ void FinishQuadMax(float (&best)[kMTiles][2],
                                              const bool (&saw_nan)[kMTiles][2]) {
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (saw_nan[m][h]) best[m][h] = fmaxf(best[m][h], kNanScore);
      best[m][h] = fmaxf(best[m][h], ShuffleXor(best[m][h], 1));
      best[m][h] = fmaxf(best[m][h], ShuffleXor(best[m][h], 2));
    }
  }
}

// Scores this group's kMTiles x 16 queries (fragments a[m] for queries
// [16m, 16m + 16) of the group) against 8-key tiles [first_tile, end_tile)
// of a staged bf16 page with head dim 16 * kKSteps. Returns in best[m][h]
// the max over those keys visible to the lane's query of m-tile m, row
// lane/4 + 8h, at position positions[m][h], reduced over the 4 lanes that
// share a query; NaN scores count -1e30. Each key fragment loaded from
// shared memory feeds kMTiles matrix instructions, so more m-tiles need less
// shared bandwidth per flop.
//
// kMasked = false: the caller knows every query sees every key of the page
// (all but the diagonal pages of a prefill), so the per-key position test
// is left out; it is most of the instructions besides the matrix ones.
template <int kKSteps, int kMTiles, bool kMasked>
__device__ __forceinline__ void ScoreStagedTiles(const uint32_t (&a)[kMTiles][kKSteps][4],
                                                 const unsigned char* staged, int first_tile,
                                                 int end_tile, int32_t block_start,
                                                 const int32_t (&positions)[kMTiles][2],
                                                 float (&best)[kMTiles][2]) {
  constexpr int kHeadDim = 16 * kKSteps;
  constexpr int kRowBytes = StagedRowBytes<KeyDtype::kBf16>(kHeadDim);
  const int lane = threadIdx.x % kGroupLanes;
  const int col = (lane % 4) * 2;
  // fmaxf drops NaN operands; whether a visible score was NaN is kept
  // apart and folded in at the end as -1e30 (SEMANTICS.md).
  bool saw_nan[kMTiles][2] = {};
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) best[m][0] = best[m][1] = -__int_as_float(0x7f800000);
  // Tiles go kTilesInFlight at a time, k steps outermost, so that four
  // independent accumulator chains keep the matrix units busy (one tile's
  // chain alone waits on each instruction's latency).
  constexpr int kTilesInFlight = 4 / kMTiles;
  for (int tile0 = first_tile; tile0 < end_tile; tile0 += kTilesInFlight) {
    float acc[kTilesInFlight][kMTiles][4] = {};
#if defined(BLOCKSEL_GPU_MMA)
    // ldmatrix.x4: lanes 8m..8m+7 address rows 0..7 (a tile's keys) of the
    // 8x8 matrix m = elements [8m, 8m + 8) of a 32-element slice; each lane
    // receives its B fragments for two k steps.
    const unsigned char* row = staged + (tile0 * 8 + lane % 8) * kRowBytes + (lane / 8) * 16;
#pragma unroll
    for (int t = 0; t < kTilesInFlight; ++t) {
      if (tile0 + t >= end_tile) continue;
      if constexpr (kKSteps == 1) {  // head dim 16: a single k step
        const int key = (tile0 + t) * 8 + lane / 4;
        const uint32_t b[2] = {StagedKeyPair(staged, key, col, kHeadDim),
                               StagedKeyPair(staged, key, col + 8, kHeadDim)};
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) MultiplyAccumulate(a[m][0], b, acc[t][m]);
      } else {
#pragma unroll
        for (int pair = 0; pair < kKSteps / 2; ++pair) {
          uint32_t b[4];
          const uint32_t address =
              static_cast<uint32_t>(__cvta_generic_to_shared(row + t * 8 * kRowBytes + pair * 64));
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                       : "r"(address));
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
            MultiplyAccumulate(a[m][2 * pair], b, acc[t][m]);
            MultiplyAccumulate(a[m][2 * pair + 1], b + 2, acc[t][m]);
          }
        }
      }
    }
#else
#pragma unroll
    for (int step = 0; step < kKSteps; ++step) {
#pragma unroll
      for (int t = 0; t < kTilesInFlight; ++t) {
        if (tile0 + t >= end_tile) continue;
        const int key = (tile0 + t) * 8 + lane / 4;
        const uint32_t b[2] = {StagedKeyPair(staged, key, step * 16 + col, kHeadDim),
                               StagedKeyPair(staged, key, step * 16 + col + 8, kHeadDim)};
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) MultiplyAccumulate(a[m][step], b, acc[t][m]);
      }
    }
#endif
    // acc[t][m][h * 2 + c]: query (m, row lane/4 + 8h) vs key
    // (tile0 + t) * 8 + col + c.
#pragma unroll
    for (int t = 0; t < kTilesInFlight; ++t) {
      if (tile0 + t >= end_tile) continue;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        FoldTileMax<kMTiles, kMasked>(acc[t][m], m, block_start + (tile0 + t) * 8 + col, positions,
                                      best, saw_nan);
      }
    }
  }
  FinishQuadMax(best, saw_nan);
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_PAGE_TILE_CUH_
