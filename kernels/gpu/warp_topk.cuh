// Top-k of a run of candidates by one warp, without sorting them: a radix
// select on order-preserving key bits finds the k-th best key, an ordered
// compaction keeps the winners, and a rank count puts them in order.
//
// Candidates are (key, id) pairs; a higher key ranks first, equal keys by
// lower id. The select breaks ties by position in the run, so a run must
// list equal keys in ascending id order (true of block ranges in block
// order, and of ranked lists of ascending block ranges laid end to end).
#ifndef BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_
#define BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_

#include <cstdint>

#include "kernels/gpu/gpu_compat.h"

namespace blocksel::gpu {

inline constexpr int kRadixBins = 256;
inline constexpr int kRadixBits = 8;
// Candidates one warp selects from at a time (staged in its scratch).
inline constexpr int kWarpTopKRun = 1024;

// One warp's shared scratch.
struct WarpTopKScratch {
  uint32_t* histogram;  // [kRadixBins]
  uint32_t* keys;       // [kWarpTopKRun]
  uint32_t* won_keys;   // [topk]
  int32_t* won_ids;     // [topk]
};

__host__ __device__ constexpr int64_t WarpTopKScratchBytes(int32_t topk) {
  return 4 * (kRadixBins + kWarpTopKRun + 2 * static_cast<int64_t>(topk));
}

__device__ inline WarpTopKScratch CarveWarpTopKScratch(unsigned char* base, int32_t topk) {
  WarpTopKScratch scratch;
  scratch.histogram = reinterpret_cast<uint32_t*>(base);
  scratch.keys = scratch.histogram + kRadixBins;
  scratch.won_keys = scratch.keys + kWarpTopKRun;
  scratch.won_ids = reinterpret_cast<int32_t*>(scratch.won_keys + topk);
  return scratch;
}

// Adds the active lanes to their bins. On NVIDIA parts lanes that share a
// bin are counted with one atomic (score keys crowd into few bins at the
// high digits, where per-lane atomics on one address would serialize).
__device__ __forceinline__ void CountInBins(uint32_t* histogram, uint32_t bin, bool active) {
#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const uint32_t peers = __match_any_sync(0xffffffffu, active ? bin : 0xffffffffu);
  if (active && LaneIndex() == __ffs(peers) - 1) atomicAdd(&histogram[bin], __popc(peers));
#else
  if (active) atomicAdd(&histogram[bin], 1u);
#endif
}

template <typename T>
__device__ __forceinline__ T WarpInclusiveSum(T value) {
  const int lane = LaneIndex();
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T below = ShuffleIndex(value, lane >= offset ? lane - offset : 0);
    if (lane >= offset) value += below;
  }
  return value;
}

// The best `topk` of candidates [0, n), n <= kWarpTopKRun: key_of(i) is
// candidate i's OrderedKey (above 0), id_of(i) its id. sink(rank, key, id)
// is called once per winner, by one of the lanes, with the ranks 0 ..
// min(n, topk) - 1. Every lane of the warp calls WarpTopK.
template <typename KeyOf, typename IdOf, typename Sink>
__device__ void WarpTopK(const KeyOf& key_of, const IdOf& id_of, int32_t n, int32_t topk,
                         const WarpTopKScratch& scratch, const Sink& sink) {
  const int lane = LaneIndex();
  // Stage the keys: the radix passes read them several times.
  constexpr int kBatch = 8;
  for (int32_t base = 0; base < n; base += kWarpSize * kBatch) {
    uint32_t batch[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int32_t i = base + u * kWarpSize + lane;
      batch[u] = i < n ? key_of(i) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int32_t i = base + u * kWarpSize + lane;
      if (i < n) scratch.keys[i] = batch[u];
    }
  }
  SyncWarp();
  // The select: after each digit, candidates whose masked key is above
  // `prefix` are winners, `remaining` more are to come from those equal.
  uint32_t prefix = 0;
  uint32_t mask = 0;
  int32_t remaining = topk;
  bool take_all_equal = true;
  if (n > topk) {
    take_all_equal = false;
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int b = lane; b < kRadixBins; b += kWarpSize) scratch.histogram[b] = 0;
      SyncWarp();
      for (int32_t base = 0; base < n; base += kWarpSize) {
        const int32_t i = base + lane;
        const uint32_t key = i < n ? scratch.keys[i] : 0u;
        CountInBins(scratch.histogram, (key >> shift) & (kRadixBins - 1),
                    i < n && (key & mask) == prefix);
      }
      SyncWarp();
      // Lane L owns kBinsPerLane bins from the top; the lane whose bins
      // reach `remaining` finds the digit of the k-th best key.
      constexpr int kBinsPerLane = kRadixBins / kWarpSize;
      uint32_t owned = 0;
#pragma unroll
      for (int j = 0; j < kBinsPerLane; ++j) {
        owned += scratch.histogram[kRadixBins - 1 - kBinsPerLane * lane - j];
      }
      const uint32_t inclusive = WarpInclusiveSum(owned);
      const uint32_t exclusive = inclusive - owned;
      const uint32_t wanted = static_cast<uint32_t>(remaining);
      const bool holds = exclusive < wanted && wanted <= inclusive;
      uint32_t digit = 0;
      uint32_t above = 0;
      uint32_t in_bin = 0;
      if (holds) {
        uint32_t run = exclusive;
        for (int j = 0; j < kBinsPerLane; ++j) {
          const uint32_t bin = kRadixBins - 1 - kBinsPerLane * lane - j;
          const uint32_t count = scratch.histogram[bin];
          if (run + count >= wanted) {
            digit = bin;
            above = run;
            in_bin = count;
            break;
          }
          run += count;
        }
      }
      const int holder = __ffsll(WarpBallot(holds)) - 1;
      digit = ShuffleIndex(digit, holder);
      above = ShuffleIndex(above, holder);
      in_bin = ShuffleIndex(in_bin, holder);
      SyncWarp();  // the histogram is read before the next pass clears it
      remaining -= static_cast<int32_t>(above);
      prefix |= digit << shift;
      mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
      if (in_bin == static_cast<uint32_t>(remaining)) {
        take_all_equal = true;
        break;
      }
    }
  }
  // Ordered compaction: winners above the prefix, then the first
  // `remaining` equal to it (all of them once the select resolved).
  int32_t won = 0;
  int32_t equal_seen = 0;
  for (int32_t base = 0; base < n; base += kWarpSize) {
    const int32_t i = base + lane;
    const bool inside = i < n;
    const uint32_t key = inside ? scratch.keys[i] : 0u;
    const uint32_t masked = key & mask;
    const bool equal = inside && masked == prefix;
    const LaneMask equal_lanes = WarpBallot(equal);
    const bool take =
        inside && (masked > prefix ||
                   (equal && (take_all_equal || equal_seen + LanesBelow(equal_lanes) < remaining)));
    const LaneMask taken_lanes = WarpBallot(take);
    const int32_t slot = won + LanesBelow(taken_lanes);
    if (take && slot < topk) {
      scratch.won_keys[slot] = key;
      scratch.won_ids[slot] = id_of(i);
    }
    won += __popcll(taken_lanes);
    equal_seen += __popcll(equal_lanes);
  }
  won = won < topk ? won : topk;
  SyncWarp();
  for (int32_t e = lane; e < won; e += kWarpSize) {
    const uint32_t key = scratch.won_keys[e];
    const int32_t id = scratch.won_ids[e];
    int32_t rank = 0;
    for (int32_t j = 0; j < won; ++j) {
      const uint32_t other = scratch.won_keys[j];
      rank += other > key || (other == key && scratch.won_ids[j] < id);
    }
    sink(rank, key, id);
  }
  SyncWarp();  // the scratch is free again
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_WARP_TOPK_CUH_
