// Runs a selection problem through one GPU kernel path, the way the
// server does (Plan, then Select) or through one of the kernel library's
// entry points, for the GPU tests. Checks with gtest as it goes.
#ifndef BLOCKSEL_TESTS_SUPPORT_GPU_RUNNER_H_
#define BLOCKSEL_TESTS_SUPPORT_GPU_RUNNER_H_

#include <cstdint>
#include <vector>

#include "kernels/gpu/gpu_selection.h"
#include "tests/support/random_batch.h"

namespace blocksel::testing {

// kDecode, kPrefill, kPrefillKeySplit: Plan pinned to that kernel, then
// Select. kPrefillKeySplit splits each tile's keys over kTestKeySplits CTAs
// (more than short rows have blocks, so some CTAs get none).
// kScoresThenTopK: vLLM's score entry point, then top-k from scores.
// kDecodeEntryPoint: LaunchDecode called directly, as in-process callers
// do, with no plan checking the workspace.
enum class GpuPath { kDecode, kPrefill, kPrefillKeySplit, kScoresThenTopK, kDecodeEntryPoint };

inline constexpr int32_t kTestKeySplits = 5;

// A device buffer freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

class GpuRunner {
 public:
  // Whether there is a device to run on; construct a runner only then.
  static bool HaveDevice();
  // Whether `path` runs `problem` (decode: topk and every span's rows x
  // heads within the decode kernel's limits).
  static bool Supports(const SelectionProblem& problem, GpuPath path);

  GpuRunner();  // device 0, a stream of its own
  ~GpuRunner();
  GpuRunner(const GpuRunner&) = delete;
  GpuRunner& operator=(const GpuRunner&) = delete;

  // Uploads the problem, runs one path, returns [H][rows][topk] (poisoned
  // first, so every slot must be written). With scores_out, the score path
  // also returns its [H][rows][max_blocks] tensor and *max_blocks.
  std::vector<int32_t> Run(const SelectionProblem& problem, GpuPath path,
                           std::vector<float>* scores_out = nullptr,
                           int32_t* max_blocks_out = nullptr);

  // Later runs use this workspace as it is (no fresh, zeroed one).
  void ReuseWorkspace(void* workspace, int64_t bytes) {
    reused_workspace_ = workspace;
    reused_workspace_bytes_ = bytes;
  }

  const gpu::DeviceInfo& device() const { return device_; }
  void* stream() const { return stream_; }

 private:
  gpu::DeviceInfo device_;
  void* stream_ = nullptr;
  void* reused_workspace_ = nullptr;
  int64_t reused_workspace_bytes_ = 0;
};

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_GPU_RUNNER_H_
