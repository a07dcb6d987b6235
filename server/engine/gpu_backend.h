// The GPU backend: keys in device memory, selection by the CUDA/HIP kernels.
#ifndef BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_
#define BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/gpu/gpu_selection.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"

namespace blocksel {

// Decode batches served by captured graphs: batch sizes are bucketed to
// powers of two up to max_batch, Q up to max_tokens.
struct GpuGraphOptions {
  int32_t max_batch = 256;
  int32_t max_tokens = 4;
};

// Owns one device allocation holding num_pages pages of every sparse layer,
// pinned host staging for uploads and results, and one stream. Appended
// keys are copied into pinned staging, then to the device with async
// copies on the stream. A selection uploads its spans, block tables and
// queries in one copy, runs the decode kernels (few rows per sequence) or
// the prefill kernel, and copies the block ids back.
//
// At creation it captures one decode graph per (batch bucket, Q) over
// persistent device buffers; a decode batch whose requests all have the same
// Q <= max_tokens and whose size fits a bucket is padded to the bucket with
// padding requests and replayed, and anything else is launched directly.
// The graphs read the layer's key pool pointer from device memory, so one
// graph serves every layer.
//
// Thread-compatible: the engine's executor is its only caller.
class GpuBackend final : public Backend {
 public:
  // FAILED_PRECONDITION without a usable device or for a head_dim the
  // kernels do not support; RESOURCE_EXHAUSTED when the device memory for
  // the cache cannot be allocated.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelConfig& config,
                                                            int64_t num_pages, int device,
                                                            GpuGraphOptions graphs);
  ~GpuBackend() override;

  absl::string_view name() const override;
  std::string detail() const override;
  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override;
  absl::Status ReadKeys(absl::Span<const KeyRead> reads) override;
  absl::StatusOr<SelectionReport> Select(int32_t layer_index, const SelectionBatch& batch) override;

 private:
  // A device or pinned buffer that grows to the largest size asked for.
  struct Buffer {
    void* data = nullptr;
    int64_t bytes = 0;
  };

  // Offsets into graph_inputs_: [key pool pointer][spans][queries][table].
  struct GraphLayout {
    int64_t spans = 256;
    int64_t queries = 0;
    int64_t table = 0;
    int64_t end = 0;
  };

  GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device,
             GpuGraphOptions graphs);
  absl::Status Reserve(Buffer* buffer, int64_t bytes, bool pinned);
  absl::Status DeviceStatus(KernelStatus status, absl::string_view what) const;
  absl::Status CaptureDecodeGraphs();
  gpu::DeviceBatch GraphBatch(int32_t bucket, int32_t tokens) const;
  // The graph for this batch, or nullptr when it must be launched directly.
  gpu::CapturedGraph* FindGraph(const SelectionBatch& batch, int32_t* bucket, int32_t* tokens);
  // Both set *staged once the inputs are staged on the host, and record
  // stage_events_ around the upload and the kernels.
  absl::Status SelectWithGraph(int32_t layer_index, const SelectionBatch& batch,
                               gpu::CapturedGraph* graph, int32_t bucket, int32_t tokens,
                               absl::Time* staged);
  absl::Status SelectDirect(int32_t layer_index, const SelectionBatch& batch, absl::Time* staged);
  // Records stage_events_[stage] on the stream.
  absl::Status MarkStage(int stage);
  const void* LayerPool(int32_t layer_index) const;

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
  Buffer scores_;         // device: block scores, when a batch asks for them
  // Recorded before the upload, after it, and after the kernels.
  std::array<void*, 3> stage_events_{};
  // Captured decode graphs and their persistent buffers.
  const GpuGraphOptions graph_options_;
  GraphLayout graph_layout_;
  Buffer graph_inputs_;
  Buffer graph_outputs_;
  Buffer graph_workspace_;
  std::map<std::pair<int32_t, int32_t>, std::unique_ptr<gpu::CapturedGraph>> graphs_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_
