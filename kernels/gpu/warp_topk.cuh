// Top-k of a run of candidates by one warp, from registers: each lane
// holds kWarpTopKPerLane candidates.
//
// The usual case takes a fixed number of warp-wide steps, whatever k is: a
// threshold no winner falls below (the k-th best of the lanes' own bests),
// the few candidates at or above it gathered in shared memory, and each
// one's rank counted against the others. Only when more than
// kWarpTopKSurvivors candidates reach the threshold (many equal keys) or k
// exceeds the warp width does the warp fall back to k rounds of a
// warp-wide max, each pulling out the next winner.
//
// Candidates are (key, id) pairs; a higher key ranks first, equal keys by
// lower id. Ties are broken by position in the run, so a run must list
// equal keys in ascending id order (true of block ranges in block order,
// and of ranked lists of ascending block ranges laid end to end).
#ifndef BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_
#define BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_

#include <cstdint>

#include "kernels/gpu/gpu_compat.h"

namespace blocksel::gpu {

inline constexpr int kWarpTopKPerLane = 16;
static_assert((kWarpTopKPerLane & (kWarpTopKPerLane - 1)) == 0, "LaneBest pairs slots");
// Candidates one warp selects from at a time.
inline constexpr int kWarpTopKRun = kWarpTopKPerLane * kWarpSize;
// Candidates at or above the threshold that the ranking path takes (two per
// lane of a 32-lane warp); the caller's scratch holds this many per warp.
inline constexpr int kWarpTopKSurvivors = 64;

// The largest (kMax) or smallest value over the warp, in every lane.
template <bool kMax>
__device__ __forceinline__ uint32_t WarpExtreme(uint32_t value) {
#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return kMax ? __reduce_max_sync(0xffffffffu, value) : __reduce_min_sync(0xffffffffu, value);
#else
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const uint32_t other = ShuffleXor(value, offset);
    value = (kMax ? other > value : other < value) ? other : value;
  }
  return value;
#endif
}

// The best of slots [kBegin, kBegin + kCount): the highest key, the first
// slot on ties (slots hold ascending positions). A tree of halves, so the
// comparisons do not wait on one another in one long chain, and every
// index is a constant (the keys stay in registers).
template <int kBegin, int kCount>
__device__ __forceinline__ void LaneBest(const uint32_t (&keys)[kWarpTopKPerLane],
                                         uint32_t* best_key, int* best_slot) {
  if constexpr (kCount == 1) {
    *best_key = keys[kBegin];
    *best_slot = kBegin;
  } else {
    uint32_t left_key, right_key;
    int left_slot, right_slot;
    LaneBest<kBegin, kCount / 2>(keys, &left_key, &left_slot);
    LaneBest<kBegin + kCount / 2, kCount / 2>(keys, &right_key, &right_slot);
    const bool right = right_key > left_key;  // the left half keeps ties
    *best_key = right ? right_key : left_key;
    *best_slot = right ? right_slot : left_slot;
  }
}

// The highest key of slots [kBegin, kBegin + kCount), as a tree.
template <int kBegin, int kCount>
__device__ __forceinline__ uint32_t LaneMax(const uint32_t (&keys)[kWarpTopKPerLane]) {
  if constexpr (kCount == 1) {
    return keys[kBegin];
  } else {
    const uint32_t left = LaneMax<kBegin, kCount / 2>(keys);
    const uint32_t right = LaneMax<kBegin + kCount / 2, kCount / 2>(keys);
    return left > right ? left : right;
  }
}

// A candidate as one number that orders as the ranking does: the key above,
// the position inverted below, so a higher value ranks first and no two
// candidates are equal.
__device__ __forceinline__ uint64_t RankedCandidate(uint32_t key, uint32_t position) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - position);
}

// The ranking path. Returns false, having called no sink, when it cannot
// take the run (more than kWarpTopKSurvivors candidates reach the
// threshold, or fewer than `winners`).
template <typename IdOf, typename Sink>
__device__ __forceinline__ bool RankSurvivors(const uint32_t (&keys)[kWarpTopKPerLane],
                                              const IdOf& id_of, int32_t winners, int32_t topk,
                                              const Sink& sink, uint64_t* scratch) {
  const int lane = LaneIndex();
  const uint32_t lane_key = LaneMax<0, kWarpTopKPerLane>(keys);
  // The topk lanes with the highest bests hold topk distinct candidates at
  // or above the least of those bests, so every winner is at or above it:
  // the threshold is the least best among lanes with fewer than topk lanes
  // above them. 0 marks empty slots and is never a candidate.
  int32_t lanes_above = 0;
#pragma unroll
  for (int other = 0; other < kWarpSize; ++other) {
    lanes_above += ShuffleIndex(lane_key, other) > lane_key ? 1 : 0;
  }
  const uint32_t least = WarpExtreme<false>(lanes_above < topk ? lane_key : 0xffffffffu);
  const uint32_t threshold = least > 1u ? least : 1u;
  // The survivors, in (slot, lane) order, into the scratch.
  int32_t survivors = 0;
#pragma unroll
  for (int j = 0; j < kWarpTopKPerLane; ++j) {
    const bool survives = keys[j] >= threshold;
    const LaneMask mask = WarpBallot(survives);
    const int32_t index = survivors + LanesBelow(mask);
    if (survives && index < kWarpTopKSurvivors) {
      scratch[index] = RankedCandidate(keys[j], static_cast<uint32_t>(j * kWarpSize + lane));
    }
    survivors += __popcll(mask);
  }
  // Fewer survivors than winners: some winners are empty slots (key 0),
  // which only the rounds rank.
  if (survivors > kWarpTopKSurvivors || survivors < winners) return false;
  SyncWarp();  // the scratch is written
  // A survivor's rank is the number of survivors ranking before it.
  for (int32_t mine_index = lane; mine_index < survivors; mine_index += kWarpSize) {
    const uint64_t mine = scratch[mine_index];
    int32_t rank = 0;
    for (int32_t other = 0; other < survivors; ++other) rank += scratch[other] > mine ? 1 : 0;
    if (rank < winners) {
      sink(rank, static_cast<uint32_t>(mine >> 32),
           id_of(static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(mine))));
    }
  }
  SyncWarp();  // the scratch is free again
  return true;
}

// The best `topk` of candidates [0, n), n <= kWarpTopKRun: key_of(i) is
// candidate i's OrderedKey (above 0), id_of(i) its id. sink(rank, key, id)
// is called once per winner, for the ranks 0 .. min(n, topk) - 1, each by
// one lane, in no set order. scratch: kWarpTopKSurvivors entries of shared
// memory owned by this warp. Every lane of the warp calls WarpTopK.
template <typename KeyOf, typename IdOf, typename Sink>
__device__ void WarpTopK(const KeyOf& key_of, const IdOf& id_of, int32_t n, int32_t topk,
                         const Sink& sink, uint64_t* scratch) {
  const int lane = LaneIndex();
  // Slot j of lane L holds candidate j * kWarpSize + L: all loads go out
  // before any is used. 0 marks an empty slot (every key is above it).
  uint32_t keys[kWarpTopKPerLane];
#pragma unroll
  for (int j = 0; j < kWarpTopKPerLane; ++j) {
    const int32_t i = j * kWarpSize + lane;
    keys[j] = i < n ? key_of(i) : 0u;
  }
  const int32_t winners = n < topk ? n : topk;
  if (winners <= 0) return;
  if (topk <= kWarpSize && RankSurvivors(keys, id_of, winners, topk, sink, scratch)) return;
  // k rounds: each a warp-wide max, the lowest position among the lanes
  // holding it, and the winning lane's rescan of its registers.
  uint32_t best_key;
  int best_slot;
  LaneBest<0, kWarpTopKPerLane>(keys, &best_key, &best_slot);
  for (int32_t rank = 0; rank < winners; ++rank) {
    const uint32_t top = WarpExtreme<true>(best_key);
    const uint32_t position =
        best_key == top ? static_cast<uint32_t>(best_slot * kWarpSize + lane) : 0xffffffffu;
    const uint32_t winner = WarpExtreme<false>(position);
    if (position == winner) {
      sink(rank, top, id_of(static_cast<int32_t>(winner)));
#pragma unroll
      for (int j = 0; j < kWarpTopKPerLane; ++j) keys[j] = j == best_slot ? 0u : keys[j];
      LaneBest<0, kWarpTopKPerLane>(keys, &best_key, &best_slot);
    }
  }
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_
