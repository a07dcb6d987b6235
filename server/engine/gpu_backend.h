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
#include "absl/time/time.h"
#include "kernels/gpu/gpu_selection.h"
#include "server/engine/backend.h"
#include "server/engine/block_table_arena.h"
#include "server/engine/model_config.h"

namespace blocksel {

struct GpuBackendOptions {
  // Decode batches served by captured graphs: batch sizes are bucketed to
  // powers of two up to graph_max_batch, Q up to graph_max_tokens.
  int32_t graph_max_batch = 256;
  int32_t graph_max_tokens = 4;
  // Entries of the device block-table arena; 0 sizes it from the page
  // count so that it never needs a reset (tests set it small).
  int64_t table_arena_entries = 0;
};

// Owns one device allocation holding num_pages pages of every sparse layer,
// the sequences' block tables in device memory (BlockTableArena), and one
// stream on which everything runs in order.
//
// Start stages, in one pinned buffer, the batch's spans, its queries, the
// keys its requests carry and the block-table entries the device lacks, and
// a kernel moves each piece into place (a copy run). A decode batch that a
// captured graph fits is then one graph launch and nothing else: the
// graph's copy kernel reads the pinned upload directly and its last kernel
// writes the block ids directly into pinned host memory, so no copy engine
// is involved either way. Anything else (prefill, block scores, shapes no
// graph covers) is one upload copy, direct launches and one download copy.
// Start returns without waiting: up to kMaxPending selections are in
// flight, each with its own pinned buffers (and graphs that use them), and
// FinishOldest polls the oldest's completion event.
//
// At creation it captures, per slot, one decode graph per (batch bucket, Q);
// a decode batch whose requests all have the same Q <= graph_max_tokens and
// whose size fits a bucket is padded to the bucket with padding requests.
// A graph reads the layer's key pool pointer from its upload, so one graph
// serves every layer.
//
// Thread-compatible: the engine's executor is its only caller.
class GpuBackend final : public Backend {
 public:
  static constexpr int kMaxPending = 4;

  // FAILED_PRECONDITION without a usable device or for a head_dim the
  // kernels do not support; RESOURCE_EXHAUSTED when the device memory for
  // the cache cannot be allocated.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelConfig& config,
                                                            int64_t num_pages, int device,
                                                            GpuBackendOptions options);
  ~GpuBackend() override;

  absl::string_view name() const override;
  std::string detail() const override;
  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override;
  absl::Status ReadKeys(absl::Span<const KeyRead> reads) override;
  void ForgetBlockTable(int32_t table_slot) override { tables_arena_.Forget(table_slot); }
  absl::Status Start(int32_t layer_index, const SelectionBatch& batch,
                     absl::Span<const KeyWrite> writes, const DevicePayload* device) override;
  int pending() const override { return pending_; }
  int max_pending() const override { return kMaxPending; }
  bool OldestReady() override;
  absl::StatusOr<SelectionReport> FinishOldest() override;

 private:
  // A device or pinned buffer that grows to the largest size asked for.
  struct Buffer {
    void* data = nullptr;
    int64_t bytes = 0;
  };

  // Where the parts of one upload go, as offsets from its start. The
  // header holds the key pool pointer (read by graphs) and the run count.
  struct UploadLayout {
    int64_t spans = 0;
    int64_t queries = 0;
    int64_t runs = 0;
    int64_t data = 0;  // keys and table entries the runs copy
    int32_t run_capacity = 0;
    int64_t data_capacity = 0;
  };

  // One selection in flight: what it uploaded from and downloads into, and
  // what finishing it needs.
  struct Slot {
    Buffer staging;  // pinned: the upload image of direct launches
    Buffer results;  // pinned: their block ids, then block scores
    // The slot's decode graphs, which read its graph upload and write its
    // graph results, both pinned and of a fixed size.
    Buffer graph_upload;
    Buffer graph_results;
    void* graph_upload_device = nullptr;   // graph_upload as kernels address it
    void* graph_results_device = nullptr;  // graph_results as kernels address it
    std::map<std::pair<int32_t, int32_t>, std::unique_ptr<gpu::CapturedGraph>> graphs;
    // Before the upload, after it, after the kernels, after the download.
    std::array<void*, 4> events{};
    int32_t* block_ids = nullptr;  // the batch's, host
    float* block_scores = nullptr;
    int64_t score_bytes = 0;
    int32_t rows = 0;                       // the batch's rows
    int32_t device_rows = 0;                // rows the device computed (a graph's bucket)
    LaunchMode mode = LaunchMode::kDirect;  // kGraph: no copies, two events
    absl::Time entered;
    absl::Time staged;
  };

  GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device,
             GpuBackendOptions options);
  absl::Status DeviceStatus(KernelStatus status, absl::string_view what) const;
  enum class Memory { kPinned, kDevice };
  // Grows a buffer to at least `bytes`. A device buffer is grown once the
  // stream is idle, since selections in flight may read it; a pinned one
  // must have no copy from it pending.
  absl::Status Reserve(Buffer* buffer, int64_t bytes, Memory memory);
  // Reserve for a decode workspace, which must be zero when first used.
  absl::Status ReserveDecodeWorkspace(Buffer* buffer, int64_t bytes);
  absl::Status CaptureDecodeGraphs();
  // The layout of graph (bucket, tokens)'s upload (a slot's graph upload),
  // whose header, spans and queries it copies to graph_inputs_.
  UploadLayout GraphLayout(int32_t bucket, int32_t tokens) const;
  // What graph (bucket, tokens) runs on, writing block_ids.
  gpu::DeviceBatch GraphBatch(int32_t bucket, int32_t tokens, int32_t* block_ids) const;
  // The slot's graph for this batch, or nullptr when it must be launched
  // directly.
  gpu::CapturedGraph* FindGraph(Slot& slot, const SelectionBatch& batch, const gpu::BatchDims& dims,
                                int32_t runs, int64_t data_bytes, int32_t* bucket, int32_t* tokens);
  // Places every span's block table in the arena (resetting it once if it
  // is full) and counts the runs and data bytes of the upload.
  absl::Status PlaceTables(const SelectionBatch& batch, absl::Span<const KeyWrite> writes,
                           std::vector<BlockTableArena::Placement>* placements, int32_t* runs,
                           int64_t* data_bytes);
  // Writes the upload image into staging: header, spans, queries, and the
  // runs with their data. A run reads its data at source_base + its offset
  // in the image: the device copy of the image, or the image itself for a
  // graph, whose runs then also copy the header, spans and queries to
  // graph_inputs_. A device payload's queries and keys are not staged: runs
  // copy them from where they are (a direct launch reads its queries in
  // place). Returns the image's size.
  int64_t StageUpload(const UploadLayout& layout, int32_t layer_index, const SelectionBatch& batch,
                      int32_t bucket, int32_t tokens, absl::Span<const KeyWrite> writes,
                      absl::Span<const BlockTableArena::Placement> placements,
                      unsigned char* staging, const unsigned char* source_base,
                      bool to_graph_inputs, const DevicePayload* device) const;
  // Enqueues the direct launches of a staged selection.
  absl::Status LaunchDirect(int32_t layer_index, const SelectionBatch& batch,
                            const gpu::BatchDims& dims, const UploadLayout& layout, int32_t runs,
                            const DevicePayload* device);
  // Enqueues a device payload's answer: rows rows of each head's block ids
  // out of block_ids (head-major, computed_rows per head) into the
  // payload, then its answer words.
  absl::Status Deliver(const DevicePayload& device, const void* block_ids, int32_t computed_rows,
                       int32_t rows);
  absl::Status Record(Slot& slot, int event);
  void* LayerPool(int32_t layer_index) const;
  int64_t KeyAddress(const KeyWrite& write) const;

  const ModelConfig config_;
  const int64_t num_pages_;
  const gpu::DeviceInfo device_;
  void* stream_ = nullptr;
  void* pool_ = nullptr;    // [selecting layers][num_pages][kBlockSize][D]
  void* tables_ = nullptr;  // int32 [tables_arena_.capacity()]: resident block tables
  BlockTableArena tables_arena_;
  std::array<Slot, kMaxPending> slots_;
  int oldest_ = 0;
  int pending_ = 0;
  // Direct launches (shared by the slots: the stream orders their use).
  Buffer inputs_;             // device: the upload
  Buffer outputs_;            // device: block ids
  Buffer decode_workspace_;   // device: decode counters and block keys
  Buffer prefill_workspace_;  // device: partial top-k lists
  Buffer scores_;             // device: block scores, when a batch asks for them
  // Appends outside a selection: one upload and one copy-run launch each.
  Buffer append_staging_;            // pinned
  Buffer append_inputs_;             // device
  void* append_uploaded_ = nullptr;  // event: append_staging_ may be reused
  // The decode graphs' device buffers, shared by the slots (the stream
  // orders their use), and the data their uploads can carry.
  const GpuBackendOptions options_;
  Buffer graph_inputs_;
  Buffer graph_workspace_;
  int64_t graph_data_capacity_ = 0;
  int64_t graph_scored_capacity_ = 0;  // scored blocks graph_workspace_ holds
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_GPU_BACKEND_H_
