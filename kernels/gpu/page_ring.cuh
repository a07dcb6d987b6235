// A ring of key pages in shared memory, filled ahead of use. On sm_90 the
// bulk-copy (TMA) engine moves each page with one instruction, completing
// on the slot's mbarrier: no per-thread copies hold the load/store units or
// count against the multiprocessor's outstanding requests. On sm_80 every
// thread issues cp.async for its share of the page, one commit group per
// page; elsewhere (HIP) plain loads fill the slot.
//
// Pages are numbered by a per-CTA sequence number: page seq lives in slot
// seq % kStages. The caller stages pages in sequence order, keeps at most
// kStages - 1 in flight, and calls Commit once per stage step (also when
// it stages nothing) so cp.async's group count stays uniform.
#ifndef BLOCKSEL_KERNELS_GPU_PAGE_RING_CUH_
#define BLOCKSEL_KERNELS_GPU_PAGE_RING_CUH_

#include <cstdint>

#include "kernels/gpu/gpu_compat.h"

#if defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define BLOCKSEL_GPU_BULK_COPY 1
#elif defined(BLOCKSEL_GPU_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define BLOCKSEL_GPU_CP_ASYNC 1
#endif

namespace blocksel::gpu {

inline constexpr int kMaxRingStages = 8;

#if defined(BLOCKSEL_GPU_CUDA)
__device__ __forceinline__ uint32_t SharedAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}
#endif

template <int kStages, int kPageBytes, int kThreads>
struct PageRing {
  static_assert(kStages >= 2 && kStages <= kMaxRingStages, "ring depth");
  static_assert(kPageBytes % 16 == 0, "pages move in 16-byte units");

  unsigned char* slots;  // [kStages][kPageBytes], 16-byte aligned
  uint64_t* full;        // [kStages] mbarriers (bulk copies only)

  __device__ unsigned char* Slot(uint32_t seq) const {
    return slots + (seq % kStages) * static_cast<uint32_t>(kPageBytes);
  }

  // Every thread calls it once, then the CTA synchronizes.
  __device__ void Init() const {
#if defined(BLOCKSEL_GPU_BULK_COPY)
    if (threadIdx.x == 0) {
      for (int stage = 0; stage < kStages; ++stage) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(SharedAddress(full + stage)));
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
#endif
  }

  // Starts copying `page` (global memory) into the slot of `seq`. Every
  // thread calls it.
  __device__ void Stage(const char* page, uint32_t seq) const {
    unsigned char* slot = Slot(seq);
#if defined(BLOCKSEL_GPU_BULK_COPY)
    if (threadIdx.x == 0) {
      const uint32_t barrier = SharedAddress(full + seq % kStages);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier),
                   "r"(kPageBytes)
                   : "memory");
      // Keys are read once: first to leave L2.
      uint64_t policy;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
          " [%0], [%1], %2, [%3], %4;\n" ::"r"(SharedAddress(slot)),
          "l"(page), "r"(kPageBytes), "r"(barrier), "l"(policy)
          : "memory");
    }
#else
    for (int chunk = threadIdx.x; chunk < kPageBytes / 16; chunk += kThreads) {
#if defined(BLOCKSEL_GPU_CP_ASYNC)
      asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(
                       SharedAddress(slot + chunk * 16)),
                   "l"(page + chunk * 16));
#else
      *reinterpret_cast<uint4*>(slot + chunk * 16) = LoadStreaming(page + chunk * 16);
#endif
    }
#endif
  }

  // Closes one stage step (cp.async's commit group; nothing otherwise).
  __device__ void Commit() const {
#if defined(BLOCKSEL_GPU_CP_ASYNC)
    asm volatile("cp.async.commit_group;\n" ::);
#endif
  }

  // Waits until the page of `seq` is in its slot, for this thread; the CTA
  // synchronizes after it before any thread reads the page (and so before
  // the slot of seq - 1 is staged again).
  __device__ void Wait(uint32_t seq) const {
#if defined(BLOCKSEL_GPU_BULK_COPY)
    const uint32_t barrier = SharedAddress(full + seq % kStages);
    const uint32_t parity = (seq / kStages) & 1u;
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(barrier),
        "r"(parity)
        : "memory");
#elif defined(BLOCKSEL_GPU_CP_ASYNC)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
#endif
    (void)seq;
  }
};

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_PAGE_RING_CUH_
