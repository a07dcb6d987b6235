// Device helpers shared by the selection kernels: exact key conversion, the
// order of candidates, and a small sorted top-k list.
#ifndef BLOCKSEL_KERNELS_GPU_SELECT_COMMON_CUH_
#define BLOCKSEL_KERNELS_GPU_SELECT_COMMON_CUH_

#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/selection_types.h"

namespace blocksel::gpu {

inline constexpr float kInitPriority = 1e30f;
inline constexpr float kLocalPriority = 1e29f;
inline constexpr float kNanScore = -1e30f;
// A list slot that holds no block: loses to every real candidate, even one
// scoring -inf, because of its id.
inline constexpr int32_t kNoBlock = 0x7fffffff;

// Bytes of one key element (KeyDtypeBytes is host-only).
template <KeyDtype kDtype>
inline constexpr int kKeyBytes = kDtype == KeyDtype::kBf16 ? 2 : 1;

__device__ __forceinline__ float Bf16BitsToFloat(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// Exact e4m3fn -> fp32 without denormal arithmetic and without branches:
// normals rebias the exponent (e - 7 + 127) on the bit pattern, subnormals
// are m * 2^-9, 0x7f is NaN, then the sign.
__device__ __forceinline__ float Fp8BitsToFloat(uint32_t byte) {
  const uint32_t magnitude = byte & 0x7Fu;
  const float normal = __uint_as_float((magnitude << 20) + (120u << 23));
  const float subnormal = static_cast<float>(magnitude) * (1.0f / 512.0f);
  uint32_t bits = __float_as_uint(magnitude < 8u ? subnormal : normal);
  bits = magnitude == 0x7Fu ? 0x7FC00000u : bits;
  return __uint_as_float(bits | ((byte & 0x80u) << 24));
}

// Candidate a ranks before b: higher score, then lower block id.
__device__ __forceinline__ bool RanksBefore(float score_a, int32_t id_a, float score_b,
                                            int32_t id_b) {
  return score_a > score_b || (score_a == score_b && id_a < id_b);
}

// Order-preserving bits of a NaN-free score: a > b exactly when
// OrderedKey(a) > OrderedKey(b) (-0 counts as +0, as RanksBefore has it);
// every key is above 0, so 0 can stand for "nothing yet".
__device__ __forceinline__ uint32_t OrderedKey(float score) {
  const uint32_t bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ float FromOrderedKey(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) != 0 ? key & 0x7FFFFFFFu : ~key);
}

// Replaces (score, id) in every lane of the warp with the best candidate
// over the warp. Scores must not be NaN.
__device__ __forceinline__ void WarpBest(float* score, int32_t* id) {
#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Two warp reductions instead of five shuffle rounds: the highest score,
  // then the lowest id among the lanes that hold it.
  const uint32_t key = OrderedKey(*score);
  const uint32_t best_key = __reduce_max_sync(0xffffffffu, key);
  const uint32_t own_id = key == best_key ? static_cast<uint32_t>(*id) : 0xffffffffu;
  *id = static_cast<int32_t>(__reduce_min_sync(0xffffffffu, own_id));
  *score = FromOrderedKey(best_key);
#else
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_score = ShuffleXor(*score, offset);
    const int32_t other_id = ShuffleXor(*id, offset);
    if (RanksBefore(other_score, other_id, *score, *id)) {
      *score = other_score;
      *id = other_id;
    }
  }
#endif
}

// The priority SEMANTICS.md gives block `block` of a row with `valid`
// visible blocks and block score `score` (already NaN-free).
__device__ __forceinline__ float BlockPriority(float score, int32_t block, int32_t valid,
                                               int32_t init_blocks, int32_t local_blocks) {
  if (block >= valid - local_blocks) return kLocalPriority;
  if (block < init_blocks) return kInitPriority;
  return score;
}

// Inserts (score, id) into a list of k entries sorted best first whose
// first `filled` entries hold candidates (the rest hold kNoBlock and lose to
// every candidate); a full list drops its last entry, which (score, id)
// must rank before. One thread owns a list.
__device__ __forceinline__ void InsertCandidate(float* scores, int32_t* ids, int32_t k,
                                                int32_t filled, float score, int32_t id) {
  int32_t slot = filled < k ? filled : k - 1;
  while (slot > 0 && RanksBefore(score, id, scores[slot - 1], ids[slot - 1])) {
    scores[slot] = scores[slot - 1];
    ids[slot] = ids[slot - 1];
    --slot;
  }
  scores[slot] = score;
  ids[slot] = id;
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_SELECT_COMMON_CUH_
