// Top-k of a run of candidates by one warp, from registers: each lane
// holds kWarpTopKPerLane candidates, and k rounds of a warp-wide max pull
// out the winners in rank order. No shared memory, no barrier; a round
// costs two warp reductions and one lane's rescan of its registers.
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

// The best `topk` of candidates [0, n), n <= kWarpTopKRun: key_of(i) is
// candidate i's OrderedKey (above 0), id_of(i) its id. sink(rank, key, id)
// is called once per winner, by one lane, with the ranks 0 .. min(n, topk)
// - 1 in order. Every lane of the warp calls WarpTopK.
template <typename KeyOf, typename IdOf, typename Sink>
__device__ void WarpTopK(const KeyOf& key_of, const IdOf& id_of, int32_t n, int32_t topk,
                         const Sink& sink) {
  const int lane = LaneIndex();
  // Slot j of lane L holds candidate j * kWarpSize + L: all loads go out
  // before any is used. 0 marks an empty slot (every key is above it).
  uint32_t keys[kWarpTopKPerLane];
#pragma unroll
  for (int j = 0; j < kWarpTopKPerLane; ++j) {
    const int32_t i = j * kWarpSize + lane;
    keys[j] = i < n ? key_of(i) : 0u;
  }
  uint32_t best_key;
  int best_slot;
  LaneBest<0, kWarpTopKPerLane>(keys, &best_key, &best_slot);
  const int32_t winners = n < topk ? n : topk;
  for (int32_t rank = 0; rank < winners; ++rank) {
    const uint32_t top = WarpExtreme<true>(best_key);
    // Among the lanes holding it, the lowest position wins.
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
