// The GPU backend: keys in device memory, selection by the CUDA/HIP kernels.
#ifndef BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_
#define BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/gpu/gpu_selection.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"

namespace blocksel {

// Owns one device allocation holding num_pages pages of every sparse layer,
// pinned host staging for uploads and results, and one stream. Appended
// keys are copied into pinned staging, then to the device with async
// copies on the stream. A selection uploads its spans, block tables and
// queries in one copy, runs the decode kernels (few rows per sequence) or
// the prefill kernel, and copies the block ids back.
//
// Thread-compatible: the engine's executor is its only caller.
class GpuBackend final : public Backend {
 public:
  // FAILED_PRECONDITION without a usable device or for a head_dim the
  // kernels do not support; RESOURCE_EXHAUSTED when the device memory for
  // the cache cannot be allocated.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelConfig& config,
                                                            int64_t num_pages, int device);
  ~GpuBackend() override;

  absl::string_view name() const override;
  std::string detail() const override;
  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override;
  absl::Status Select(int32_t layer_index, const SelectionBatch& batch) override;

 private:
  // A device or pinned buffer that grows to the largest size asked for.
  struct Buffer {
    void* data = nullptr;
    int64_t bytes = 0;
  };

  GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device);
  absl::Status Reserve(Buffer* buffer, int64_t bytes, bool pinned);
  absl::Status DeviceStatus(KernelStatus status, absl::string_view what) const;

  const ModelConfig config_;
  const int64_t num_pages_;
  const gpu::DeviceInfo device_;
  void* stream_ = nullptr;
  void* pool_ = nullptr;  // [sparse layers][num_pages][kBlockSize][D]
  Buffer staging_;        // pinned: keys to append, batch inputs
  Buffer results_;        // pinned: block ids
  Buffer inputs_;         // device: spans, block table, queries
  Buffer outputs_;        // device: block ids
  Buffer workspace_;      // device: decode partial top-k lists
  std::vector<unsigned char> packed_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_
