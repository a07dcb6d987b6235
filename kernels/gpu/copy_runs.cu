// Scatters an upload into place on the device: each run copies bytes from
// the upload buffer to where they belong (appended keys into their pages,
// new block-table entries into the resident tables). One launch replaces a
// copy call per run, and its run count is read on the device, so one
// captured launch serves any number of runs up to the capacity.
#include <cstdint>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 64;

__global__ void __launch_bounds__(kThreads)
    CopyRunsKernel(const CopyRun* runs, const int32_t* num_runs) {
  const int32_t count = *num_runs;
  for (int32_t r = blockIdx.x; r < count; r += gridDim.x) {
    const CopyRun run = runs[r];
    auto* to = reinterpret_cast<unsigned char*>(run.destination);
    const auto* from = reinterpret_cast<const unsigned char*>(run.source);
    if (((run.destination | run.source | run.bytes) & 15u) == 0) {
      for (uint32_t i = threadIdx.x * 16; i < run.bytes; i += kThreads * 16) {
        *reinterpret_cast<uint4*>(to + i) = *reinterpret_cast<const uint4*>(from + i);
      }
    } else {
      for (uint32_t i = threadIdx.x * 4; i < run.bytes; i += kThreads * 4) {
        *reinterpret_cast<uint32_t*>(to + i) = *reinterpret_cast<const uint32_t*>(from + i);
      }
    }
  }
}

}  // namespace

KernelStatus LaunchCopyRuns(const CopyRun* runs, const int32_t* num_runs, void* stream) {
  if (runs == nullptr || num_runs == nullptr) return KernelStatus::kInvalidArgument;
  CopyRunsKernel<<<kBlocks, kThreads, 0, static_cast<gpuStream_t>(stream)>>>(runs, num_runs);
  return gpuGetLastError() == gpuSuccess ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

}  // namespace blocksel::gpu
