// Scoring a staged key page with Hopper's warpgroup matrix instructions
// (wgmma): the 4 warps of a warpgroup score their 64 queries against the
// page's 128 keys in one m64n128 tile per 16-element k step. The queries
// come from registers, in the same fragment layout as mma.sync's A (each
// warp its 16 queries); the keys are read straight from shared memory
// through a descriptor, so no lane loads key fragments, and the
// accumulators land in the m16n8 layout the mma.sync path produces (8-key
// tile t in d[4t, 4t + 4)).
#ifndef BLOCKSEL_KERNELS_GPU_WGMMA_TILE_CUH_
#define BLOCKSEL_KERNELS_GPU_WGMMA_TILE_CUH_

#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/page_tile.cuh"
#include "kernels/gpu/select_common.cuh"

// wgmma exists on sm_90a only (the arch-specific feature set).
#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BLOCKSEL_GPU_WGMMA 1
#endif

namespace blocksel::gpu {

// Accumulators per thread of one m64n128 tile.
inline constexpr int kWgmmaAccumulators = 64;

// Head dims the warpgroup path takes: whole 64-element swizzle panels, and
// query fragments (4 registers per k step) that leave room for the
// accumulators.
__host__ __device__ constexpr bool WgmmaTakes(int k_steps) {
  return k_steps % 4 == 0 && k_steps <= 8;
}

// The swizzle pattern repeats every 8 rows of 128 bytes: a swizzled page
// must start on a 1024-byte boundary of shared memory.
inline constexpr int kSwizzleAlignment = 8 * kSwizzleRowBytes;

__device__ __forceinline__ unsigned char* AlignForSwizzle(unsigned char* shared) {
#if defined(BLOCKSEL_GPU_CUDA)
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  return shared + (kSwizzleAlignment - address % kSwizzleAlignment) % kSwizzleAlignment;
#else
  return shared;
#endif
}

#if defined(BLOCKSEL_GPU_WGMMA)
// Shared-memory matrix descriptor of a K-major operand in the 128-byte
// swizzle: start address, leading byte offset (unused by this layout, 16 by
// convention), stride byte offset between 8-row groups (1024), swizzle mode
// 1 (128 B) in the top bits. Addresses and offsets are in 16-byte units.
__device__ __forceinline__ uint64_t SwizzledDescriptor(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3FFFFu) >> 4) | (uint64_t{16 >> 4} << 16) |
         (uint64_t{kSwizzleAlignment >> 4} << 32) | (uint64_t{1} << 62);
}

// d (+)= A * B for one k step: a, this thread's A fragment (4 packed bf16
// pairs); B, 16 elements of 128 keys at the descriptor.
__device__ __forceinline__ void WgmmaM64N128K16(float (&d)[kWgmmaAccumulators],
                                                const uint32_t (&a)[4], uint64_t b_descriptor,
                                                bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, accumulate, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor),
        "r"(static_cast<uint32_t>(accumulate)));
}

// Starts scoring the warpgroup's 64 queries (this thread's fragments a,
// head dim 16 * kKSteps) against the swizzled bf16 page at `staged` into d;
// d holds the scores after WgmmaWaitScores. Every thread
// of the warpgroup calls it.
template <int kKSteps>
__device__ __forceinline__ void WgmmaIssuePage(const uint32_t (&a)[kKSteps][4],
                                               const unsigned char* staged,
                                               float (&d)[kWgmmaAccumulators]) {
  static_assert(WgmmaTakes(kKSteps), "head dim");
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(staged));
  // Orders this thread's earlier accesses to d (the fold of the scores it
  // held) before the asynchronous matrix instructions write it.
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int step = 0; step < kKSteps; ++step) {
    // k step s: 32 bytes into the rows of panel s / 4.
    const uint32_t address = base + (step / 4) * kSwizzlePanelBytes + (step % 4) * 32;
    WgmmaM64N128K16(d, a[step], SwizzledDescriptor(address), step > 0);
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until the issued page's scores are in d, then pins d after the
// wait, so that no read of it is scheduled before the matrix instructions
// finish.
__device__ __forceinline__ void WgmmaWaitScores(float (&d)[kWgmmaAccumulators]) {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < kWgmmaAccumulators; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // BLOCKSEL_GPU_WGMMA

// Reduces the accumulators of one m64n128 tile to this thread's two block
// maxima: best[h] for query row lane/4 + 8h of its warp, over the keys that
// row sees (kMasked: the key at first_key + 8t + c, for d[4t + 2h + c], is
// visible when at or before positions[h]), then over the 4 lanes sharing
// the row. A NaN score counts -1e30 (SEMANTICS.md); it can change the
// result only when no visible score beats -1e30, so the accumulators are
// searched for NaN only then.
template <bool kMasked>
__device__ __forceinline__ void FoldPageMax(const float (&d)[kWgmmaAccumulators], int32_t first_key,
                                            const int32_t (&positions)[2], float (&best)[2]) {
  // Four independent chains per row, so the maxima do not wait on one
  // another.
  constexpr int kChains = 4;
  float partial[kChains][2];
#pragma unroll
  for (int c = 0; c < kChains; ++c) partial[c][0] = partial[c][1] = -__int_as_float(0x7f800000);
  auto visible = [&](int i) {
    return !kMasked || first_key + 8 * (i / 4) + i % 2 <= positions[(i / 2) % 2];
  };
  // Selects, not branches: the masked fold stays straight-line code.
#pragma unroll
  for (int i = 0; i < kWgmmaAccumulators; ++i) {
    float& chain = partial[(i / 4) % kChains][(i / 2) % 2];
    chain = fmaxf(chain, visible(i) ? d[i] : -__int_as_float(0x7f800000));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    best[h] = fmaxf(fmaxf(partial[0][h], partial[1][h]), fmaxf(partial[2][h], partial[3][h]));
    if (best[h] < kNanScore) {
      bool saw_nan = false;
#pragma unroll
      for (int i = 0; i < kWgmmaAccumulators; ++i) {
        if ((i / 2) % 2 == h) saw_nan |= visible(i) && isnan(d[i]);
      }
      if (saw_nan) best[h] = kNanScore;
    }
    best[h] = fmaxf(best[h], ShuffleXor(best[h], 1));
    best[h] = fmaxf(best[h], ShuffleXor(best[h], 2));
  }
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_WGMMA_TILE_CUH_
