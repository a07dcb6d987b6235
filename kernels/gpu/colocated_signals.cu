// The co-located data plane's kernels (colocated_signals.h).
#include <algorithm>
#include <cstdint>

#include "kernels/gpu/colocated_signals.h"
#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kAwaitThreads = 1024;
// Bytes one CTA of a post copies at least: small requests take one CTA.
constexpr int64_t kPostBytesPerCta = int64_t{64} << 10;
constexpr int kMaxPostCtas = 64;

__device__ __forceinline__ uint64_t DeviceTicks() {
#if defined(BLOCKSEL_GPU_HIP) && defined(__HIP_DEVICE_COMPILE__)
  return __builtin_amdgcn_s_memrealtime();  // a constant 100 MHz on gfx9 and CDNA
#elif defined(BLOCKSEL_GPU_HIP)
  return 0;              // the host pass compiles device code it never runs
#else
  uint64_t ticks;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ticks));
  return ticks;
#endif
}

__device__ __forceinline__ uint32_t LoadVolatile(const uint32_t* word) {
  return *static_cast<const volatile uint32_t*>(word);
}

__device__ __forceinline__ void StoreVolatile(uint32_t* word, uint32_t value) {
  *static_cast<volatile uint32_t*>(word) = value;
}

__device__ __forceinline__ uint32_t* Word(const SlotRing& ring, uint32_t slot, int64_t offset) {
  return reinterpret_cast<uint32_t*>(ring.controls + int64_t{slot} * ring.control_stride + offset);
}

// Spins until the word holds `expected`; returns kNone then, or why it
// gave up.
__device__ SessionFailure WaitForWord(const SlotRing& ring, const uint32_t* word, uint32_t expected,
                                      int64_t timeout_ticks) {
  const uint64_t start = DeviceTicks();
  while (LoadVolatile(word) != expected) {
    if (LoadVolatile(ring.region_state) != ring.serving_state) return SessionFailure::kRegionClosed;
    if (static_cast<int64_t>(DeviceTicks() - start) > timeout_ticks) {
      return SessionFailure::kTimedOut;
    }
  }
  __threadfence_system();  // what the other side wrote before the word
  return SessionFailure::kNone;
}

// Copies bytes [begin, end) of from to to, 16 bytes a thread where both
// are aligned (slot payloads always are), 4 otherwise.
__device__ void CopyBytes(unsigned char* to, const unsigned char* from, int64_t begin, int64_t end,
                          int thread, int threads) {
  if (((reinterpret_cast<uintptr_t>(to) | reinterpret_cast<uintptr_t>(from) | begin | end) & 15) ==
      0) {
    for (int64_t i = begin + thread * 16; i < end; i += int64_t{threads} * 16) {
      *reinterpret_cast<uint4*>(to + i) = *reinterpret_cast<const uint4*>(from + i);
    }
  } else {
    for (int64_t i = begin + thread * 4; i < end; i += int64_t{threads} * 4) {
      *reinterpret_cast<uint32_t*>(to + i) = *reinterpret_cast<const uint32_t*>(from + i);
    }
  }
}

// Each CTA copies its share of the queries and keys once the slot is free;
// the last CTA to finish writes the metadata and rings the doorbell, after
// a system-scope fence, so the server's host thread that sees the doorbell
// sees the whole request.
__global__ void __launch_bounds__(kThreads)
    PostKernel(SlotRing ring, PostedRequest request, uint32_t slot, uint32_t* sequences,
               SessionWords* words, uint32_t* scratch, int64_t timeout_ticks) {
  __shared__ SessionFailure failure;
  __shared__ bool last;
  const uint32_t sequence = LoadVolatile(&sequences[slot]);
  if (threadIdx.x == 0) {
    // Both words are in host memory: the loads go out together.
    const uint32_t sticky = LoadVolatile(&words->failure);
    const uint32_t* completion = Word(ring, slot, ring.completion_offset);
    const bool free = LoadVolatile(completion) == sequence - ring.slot_count;
    failure = static_cast<SessionFailure>(sticky);
    if (failure == SessionFailure::kNone && !free) {
      failure = WaitForWord(ring, completion, sequence - ring.slot_count, timeout_ticks);
    }
  }
  __syncthreads();
  unsigned char* payload = ring.payloads + int64_t{slot} * ring.slot_stride;
  if (failure == SessionFailure::kNone) {
    const int thread = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    const int threads = static_cast<int>(gridDim.x * blockDim.x);
    CopyBytes(payload + request.query_offset, static_cast<const unsigned char*>(request.queries), 0,
              request.query_bytes, thread, threads);
    if (request.keys != nullptr) {
      CopyBytes(payload + request.key_offset, static_cast<const unsigned char*>(request.keys), 0,
                request.key_bytes, thread, threads);
    }
  } else if (threadIdx.x == 0) {
    atomicMax(&scratch[1], static_cast<uint32_t>(failure));
  }
  // The payload is device memory: a device-wide fence orders it before the
  // count, and the last CTA's system-wide fence orders both before the
  // doorbell.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&scratch[0], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  // The last CTA: every copy is done and fenced.
  __shared__ SessionFailure outcome;
  if (threadIdx.x == 0) {
    outcome = static_cast<SessionFailure>(atomicExch(&scratch[1], 0u));
    scratch[0] = 0;
    StoreVolatile(&sequences[slot], sequence + ring.slot_count);
  }
  __syncthreads();
  if (outcome == SessionFailure::kNone) {
    // The whole CTA: the batch is read from host memory, where one
    // thread's loads would queue one after another.
    CopyBytes(ring.metadata + int64_t{slot} * ring.metadata_stride,
              static_cast<const unsigned char*>(request.metadata), 0, request.metadata_bytes,
              static_cast<int>(threadIdx.x), kThreads);
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x != 0) return;
  // The kernel's end makes these last stores visible.
  if (outcome != SessionFailure::kNone) {
    StoreVolatile(&words->failure, static_cast<uint32_t>(outcome));
  } else {
    StoreVolatile(Word(ring, slot, ring.doorbell_offset), sequence);
  }
}

// Runs once the slot's answer flag is set: by the server's answer, or by a
// closing region.
__global__ void __launch_bounds__(kAwaitThreads)
    AwaitKernel(SlotRing ring, uint32_t slot, int64_t ids_offset, int64_t ids_bytes, int32_t* ids,
                uint32_t* sequences, SessionWords* words) {
  __shared__ SessionFailure failure;
  __shared__ uint32_t status;
  uint32_t* const awaited = &sequences[ring.slot_count + slot];
  const uint32_t sequence = LoadVolatile(awaited);
  if (threadIdx.x == 0) {
    // All in host memory, none depending on another: the loads go out
    // together. The server wrote them all before it set the flag.
    const uint32_t sticky = LoadVolatile(&words->failure);
    const uint32_t state = LoadVolatile(ring.region_state);
    const uint32_t completion = LoadVolatile(Word(ring, slot, ring.completion_offset));
    const uint32_t answer = LoadVolatile(Word(ring, slot, ring.status_offset));
    failure = static_cast<SessionFailure>(sticky);
    if (failure == SessionFailure::kNone &&
        (state != ring.serving_state || completion != sequence)) {
      failure = SessionFailure::kRegionClosed;
    }
    status = failure == SessionFailure::kNone ? answer : 0;
  }
  __syncthreads();
  // A refused request leaves the slot's ids as they were: the caller gets
  // -1 rows, never another request's blocks.
  if (failure == SessionFailure::kNone && status == 0) {
    CopyBytes(reinterpret_cast<unsigned char*>(ids),
              ring.payloads + int64_t{slot} * ring.slot_stride + ids_offset, 0, ids_bytes,
              static_cast<int>(threadIdx.x), kAwaitThreads);
  } else {
    for (int64_t i = threadIdx.x; i < ids_bytes / 4; i += kAwaitThreads) ids[i] = -1;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  StoreVolatile(awaited, sequence + ring.slot_count);
  StoreVolatile(&words->last_sequence, sequence);
  StoreVolatile(reinterpret_cast<uint32_t*>(&words->last_status), status);
  StoreVolatile(&words->failure, static_cast<uint32_t>(failure));
  // Taken: the next answer of this slot sets the flag again. A closed
  // region keeps it set, so later waits end at once.
  if (failure == SessionFailure::kNone) StoreVolatile(Word(ring, slot, ring.answer_flag_offset), 0);
}

__global__ void __launch_bounds__(kAwaitThreads) DeliverKernel(DeliveredAnswer answer) {
  for (int64_t row = 0; row < answer.rows; ++row) {
    CopyBytes(static_cast<unsigned char*>(answer.to) + row * answer.to_pitch,
              static_cast<const unsigned char*>(answer.from) + row * answer.from_pitch, 0,
              answer.row_bytes, static_cast<int>(threadIdx.x), kAwaitThreads);
  }
  if (threadIdx.x == 0) {
    StoreVolatile(reinterpret_cast<uint32_t*>(answer.status), 0);
    StoreVolatile(answer.message_bytes, 0);
    StoreVolatile(answer.completion, answer.sequence);
  }
  // The ids and the words above reach the worker before the flag does: the
  // worker reads them only once it sees the flag.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) StoreVolatile(answer.answer_flag, 1);
}

KernelStatus LaunchStatus() {
  return gpuGetLastError() == gpuSuccess ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

}  // namespace

KernelStatus LaunchPostRequest(const SlotRing& ring, const PostedRequest& request, uint32_t slot,
                               uint32_t* sequences, SessionWords* words, uint32_t* scratch,
                               int64_t timeout_ticks, void* stream) {
  if (ring.slot_count == 0 || (ring.slot_count & (ring.slot_count - 1)) != 0 ||
      slot >= ring.slot_count || ring.controls == nullptr || ring.payloads == nullptr ||
      request.queries == nullptr || request.metadata == nullptr || sequences == nullptr ||
      words == nullptr || scratch == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  const int64_t bytes = request.query_bytes + (request.keys != nullptr ? request.key_bytes : 0);
  const auto ctas = static_cast<int>(
      std::min<int64_t>(kMaxPostCtas, std::max<int64_t>(1, bytes / kPostBytesPerCta)));
  PostKernel<<<ctas, kThreads, 0, static_cast<gpuStream_t>(stream)>>>(
      ring, request, slot, sequences, words, scratch, timeout_ticks);
  return LaunchStatus();
}

KernelStatus LaunchAwaitAnswer(const SlotRing& ring, uint32_t slot, int64_t ids_offset,
                               int64_t ids_bytes, int32_t* ids, uint32_t* sequences,
                               SessionWords* words, void* stream) {
  if (ring.slot_count == 0 || slot >= ring.slot_count || ring.controls == nullptr ||
      ids == nullptr || sequences == nullptr || words == nullptr || ids_bytes % 4 != 0) {
    return KernelStatus::kInvalidArgument;
  }
  const KernelStatus waited = StreamWaitWord(
      stream,
      reinterpret_cast<const uint32_t*>(ring.controls + int64_t{slot} * ring.control_stride +
                                        ring.answer_flag_offset),
      1);
  if (waited != KernelStatus::kOk) return waited;
  AwaitKernel<<<1, kAwaitThreads, 0, static_cast<gpuStream_t>(stream)>>>(
      ring, slot, ids_offset, ids_bytes, ids, sequences, words);
  return LaunchStatus();
}

KernelStatus LaunchDeliverAnswer(const DeliveredAnswer& answer, void* stream) {
  if (answer.from == nullptr || answer.to == nullptr || answer.status == nullptr ||
      answer.message_bytes == nullptr || answer.completion == nullptr ||
      answer.answer_flag == nullptr ||
      ((answer.row_bytes | answer.from_pitch | answer.to_pitch) & 3) != 0) {
    return KernelStatus::kInvalidArgument;
  }
  DeliverKernel<<<1, kAwaitThreads, 0, static_cast<gpuStream_t>(stream)>>>(answer);
  return LaunchStatus();
}

int64_t TicksPerSecond(int /*device*/) {
#if defined(BLOCKSEL_GPU_HIP)
  // s_memrealtime counts a constant 100 MHz clock (the runtime this builds
  // against has no attribute to ask).
  return 100'000'000;
#else
  return 1'000'000'000;  // %globaltimer counts nanoseconds
#endif
}

}  // namespace blocksel::gpu
