// One source tree for CUDA (nvcc) and HIP (hipcc / CMake HIP): the runtime
// calls and device intrinsics the kernels use, under one set of names.
//
// HIP's own NVIDIA headers do not build against CUDA 13, so this shim maps
// to each runtime directly. Warp width is never assumed: device code uses
// kWarpSize (32 on NVIDIA, 64 on CDNA wavefronts).
#ifndef BLOCKSEL_KERNELS_GPU_GPU_COMPAT_H_
#define BLOCKSEL_KERNELS_GPU_GPU_COMPAT_H_

#include <cstdint>

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define BLOCKSEL_GPU_HIP 1
using gpuError_t = hipError_t;
using gpuStream_t = hipStream_t;
using gpuEvent_t = hipEvent_t;
using gpuGraph_t = hipGraph_t;
using gpuGraphExec_t = hipGraphExec_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuGetDeviceProperties hipGetDeviceProperties
#define gpuDeviceProp_t hipDeviceProp_t
// HIP has no opt-in beyond the per-block default (64 KiB of LDS).
#define gpuSharedMemPerBlockOptin(properties) ((properties).sharedMemPerBlock)
#define gpuMalloc hipMalloc
#define gpuHostAlloc hipHostMalloc
#define gpuHostAllocMapped hipHostMallocMapped
#define gpuHostGetDevicePointer hipHostGetDevicePointer
#define gpuFree hipFree
#define gpuHostRegister hipHostRegister
#define gpuDeviceGetPCIBusId hipDeviceGetPCIBusId
#define gpuDeviceGetByPCIBusId hipDeviceGetByPCIBusId
#define gpuDeviceCanAccessPeer hipDeviceCanAccessPeer
#define gpuHostRegisterMapped (hipHostRegisterMapped | hipHostRegisterPortable)
#define gpuHostUnregister hipHostUnregister
using gpuIpcMemHandle_t = hipIpcMemHandle_t;
#define gpuIpcGetMemHandle hipIpcGetMemHandle
#define gpuIpcOpenMemHandle hipIpcOpenMemHandle
#define gpuIpcMemLazyEnablePeerAccess hipIpcMemLazyEnablePeerAccess
#define gpuIpcCloseMemHandle hipIpcCloseMemHandle
#define gpuFreeHost hipHostFree
#define gpuMemcpyAsync hipMemcpyAsync
#define gpuMemsetAsync hipMemsetAsync
#define gpuMemcpyHostToDevice hipMemcpyHostToDevice
#define gpuMemcpyDeviceToHost hipMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define gpuStreamCreateWithFlags hipStreamCreateWithFlags
#define gpuStreamNonBlocking hipStreamNonBlocking
#define gpuStreamDestroy hipStreamDestroy
#define gpuStreamSynchronize hipStreamSynchronize
#define gpuStreamBeginCapture hipStreamBeginCapture
#define gpuStreamEndCapture hipStreamEndCapture
#define gpuStreamCaptureModeThreadLocal hipStreamCaptureModeThreadLocal
#define gpuGraphInstantiate(exec, graph) hipGraphInstantiate((exec), (graph), nullptr, nullptr, 0)
#define gpuGraphLaunch hipGraphLaunch
#define gpuGraphDestroy hipGraphDestroy
#define gpuGraphExecDestroy hipGraphExecDestroy
#define gpuEventCreate hipEventCreate
#define gpuEventQuery hipEventQuery
#define gpuErrorNotReady hipErrorNotReady
#define gpuEventRecord hipEventRecord
#define gpuEventSynchronize hipEventSynchronize
#define gpuEventElapsedTime hipEventElapsedTime
#define gpuEventDestroy hipEventDestroy
#define gpuSetDevice hipSetDevice
#define gpuFuncSetMaxDynamicSharedMemory(kernel, bytes)      \
  hipFuncSetAttribute(reinterpret_cast<const void*>(kernel), \
                      hipFuncAttributeMaxDynamicSharedMemorySize, (bytes))
#else
#include <cuda_runtime.h>
#define BLOCKSEL_GPU_CUDA 1
using gpuError_t = cudaError_t;
using gpuStream_t = cudaStream_t;
using gpuEvent_t = cudaEvent_t;
using gpuGraph_t = cudaGraph_t;
using gpuGraphExec_t = cudaGraphExec_t;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuGetDeviceProperties cudaGetDeviceProperties
#define gpuDeviceProp_t cudaDeviceProp
#define gpuSharedMemPerBlockOptin(properties) ((properties).sharedMemPerBlockOptin)
#define gpuMalloc cudaMalloc
#define gpuHostAlloc cudaHostAlloc
#define gpuHostAllocMapped cudaHostAllocMapped
#define gpuHostGetDevicePointer cudaHostGetDevicePointer
#define gpuFree cudaFree
#define gpuHostRegister cudaHostRegister
#define gpuDeviceGetPCIBusId cudaDeviceGetPCIBusId
#define gpuDeviceGetByPCIBusId cudaDeviceGetByPCIBusId
#define gpuDeviceCanAccessPeer cudaDeviceCanAccessPeer
#define gpuHostRegisterMapped (cudaHostRegisterMapped | cudaHostRegisterPortable)
#define gpuHostUnregister cudaHostUnregister
using gpuIpcMemHandle_t = cudaIpcMemHandle_t;
#define gpuIpcGetMemHandle cudaIpcGetMemHandle
#define gpuIpcOpenMemHandle cudaIpcOpenMemHandle
#define gpuIpcMemLazyEnablePeerAccess cudaIpcMemLazyEnablePeerAccess
#define gpuIpcCloseMemHandle cudaIpcCloseMemHandle
#define gpuFreeHost cudaFreeHost
#define gpuMemcpyAsync cudaMemcpyAsync
#define gpuMemsetAsync cudaMemsetAsync
#define gpuMemcpyHostToDevice cudaMemcpyHostToDevice
#define gpuMemcpyDeviceToHost cudaMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice cudaMemcpyDeviceToDevice
#define gpuStreamCreateWithFlags cudaStreamCreateWithFlags
#define gpuStreamNonBlocking cudaStreamNonBlocking
#define gpuStreamDestroy cudaStreamDestroy
#define gpuStreamSynchronize cudaStreamSynchronize
#define gpuStreamBeginCapture cudaStreamBeginCapture
#define gpuStreamEndCapture cudaStreamEndCapture
#define gpuStreamCaptureModeThreadLocal cudaStreamCaptureModeThreadLocal
#define gpuGraphInstantiate(exec, graph) cudaGraphInstantiate((exec), (graph), 0)
#define gpuGraphLaunch cudaGraphLaunch
#define gpuGraphDestroy cudaGraphDestroy
#define gpuGraphExecDestroy cudaGraphExecDestroy
#define gpuEventCreate cudaEventCreate
#define gpuEventQuery cudaEventQuery
#define gpuErrorNotReady cudaErrorNotReady
#define gpuEventRecord cudaEventRecord
#define gpuEventSynchronize cudaEventSynchronize
#define gpuEventElapsedTime cudaEventElapsedTime
#define gpuEventDestroy cudaEventDestroy
#define gpuSetDevice cudaSetDevice
#define gpuFuncSetMaxDynamicSharedMemory(kernel, bytes) \
  cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (bytes))
#endif

namespace blocksel::gpu {

// Threads per warp (NVIDIA) or wavefront (AMD CDNA: 64). A compile-time
// constant for the device pass being compiled.
#if defined(BLOCKSEL_GPU_HIP) && defined(__AMDGCN_WAVEFRONT_SIZE)
inline constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE;
#elif defined(BLOCKSEL_GPU_HIP)
inline constexpr int kWarpSize = 64;
#else
inline constexpr int kWarpSize = 32;
#endif

// Full-warp shuffles. HIP has no *_sync variants and no lane masks.
template <typename T>
__device__ __forceinline__ T ShuffleXor(T value, int lane_mask) {
#if defined(BLOCKSEL_GPU_HIP)
  return __shfl_xor(value, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, value, lane_mask, kWarpSize);
#endif
}

template <typename T>
__device__ __forceinline__ T ShuffleIndex(T value, int source_lane) {
#if defined(BLOCKSEL_GPU_HIP)
  return __shfl(value, source_lane, kWarpSize);
#else
  return __shfl_sync(0xffffffffu, value, source_lane, kWarpSize);
#endif
}

// A 16-byte load of data read once: marked evict-first, so streaming keys
// do not push out what the kernel reuses.
__device__ __forceinline__ uint4 LoadStreaming(const void* address) {
#if defined(BLOCKSEL_GPU_HIP)
  return *static_cast<const uint4*>(address);  // no cache hint on HIP
#else
  return __ldcs(static_cast<const uint4*>(address));
#endif
}

// A load of data other CTAs of the running kernel wrote (after a fence):
// from L2, never from a stale line of this multiprocessor's L1.
__device__ __forceinline__ uint32_t LoadCoherent(const uint32_t* address) {
#if defined(BLOCKSEL_GPU_HIP)
  return *static_cast<const volatile uint32_t*>(address);
#else
  return __ldcg(address);
#endif
}

// Lane masks of a whole warp, 64 bits wide whatever the warp width, and
// the lane's index within its warp.
// unsigned long long: the type __popcll and __ffsll take.
using LaneMask = unsigned long long;  // NOLINT(google-runtime-int)

__device__ __forceinline__ int LaneIndex() { return static_cast<int>(threadIdx.x) % kWarpSize; }

__device__ __forceinline__ LaneMask WarpBallot(bool predicate) {
#if defined(BLOCKSEL_GPU_HIP)
  return __ballot(predicate);
#else
  return __ballot_sync(0xffffffffu, predicate);
#endif
}

// Lanes of `mask` below this lane: an ordered slot among the lanes that
// set a ballot.
__device__ __forceinline__ int LanesBelow(LaneMask mask) {
  return __popcll(mask & ((LaneMask{1} << LaneIndex()) - 1));
}

// Orders shared-memory accesses among the lanes of one warp. AMD
// wavefronts execute in lockstep; a wave barrier keeps the compiler from
// reordering across it.
__device__ __forceinline__ void SyncWarp() {
#if defined(BLOCKSEL_GPU_HIP)
  __builtin_amdgcn_wave_barrier();
#else
  __syncwarp();
#endif
}

// Programmatic dependent launch (sm_90+): a kernel launched with
// LaunchDependent may start while the kernel before it in the stream is
// still running, hiding its launch latency. It must call WaitForPriorGrid()
// before reading anything that kernel writes; the earlier kernel calls
// AllowDependentLaunch() once its CTAs no longer need the SMs to themselves.
// Both calls are no-ops elsewhere (older NVIDIA parts, HIP), where the
// launch is an ordinary one. Graph capture keeps the dependency.
__device__ __forceinline__ void AllowDependentLaunch() {
#if !defined(BLOCKSEL_GPU_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

__device__ __forceinline__ void WaitForPriorGrid() {
#if !defined(BLOCKSEL_GPU_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}

template <typename... Params, typename... Args>
gpuError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                           gpuStream_t stream, Args... args) {
#if defined(BLOCKSEL_GPU_HIP)
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  return hipGetLastError();
#else
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
#endif
}

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_GPU_COMPAT_H_
