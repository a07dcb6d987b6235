#include "server/engine/gpu_backend.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/gpu/colocated_signals.h"
#include "server/common/status_macros.h"

namespace blocksel {
namespace {

int64_t AlignUp(int64_t value) { return (value + 255) / 256 * 256; }
int64_t AlignUp16(int64_t value) { return (value + 15) / 16 * 16; }

// The first bytes of every upload.
struct UploadHeader {
  const void* key_pool;  // the layer's pages; read by captured graphs
  int32_t num_runs;      // copy runs after the queries
  int32_t reserved;
};
constexpr int64_t kHeaderBytes = 256;
static_assert(sizeof(UploadHeader) <= kHeaderBytes);
constexpr int64_t kNumRunsOffset = offsetof(UploadHeader, num_runs);
// Runs are cut into pieces of at most this, so that the copy kernel's
// blocks share a long copy (those of a graph read host memory, where one
// block alone would wait on every load).
constexpr int64_t kPieceBytes = 4096;

// Blocks the last row of a span sees: the block-table entries it needs.
int32_t SpanBlocks(const RowSpan& span) {
  const int64_t last = int64_t{span.first_position} + span.num_rows - 1;
  return VisibleBlocks(last);
}

// The dimensions the kernel plan and the graphs go by.
gpu::BatchDims DimsOf(const SelectionShape& shape, const SelectionBatch& batch) {
  gpu::BatchDims dims;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    gpu::AddSpan(shape, batch.spans[s].first_position, batch.spans[s].num_rows, &dims);
  }
  return dims;
}

// Entries of the device table arena: every page can be one table entry,
// each table may round up to twice its length, and each sequence's first
// segment holds BlockTableArena::kMinSegment entries.
int64_t ArenaCapacity(int64_t num_pages) {
  return std::max<int64_t>(int64_t{1} << 16, num_pages * (2 + BlockTableArena::kMinSegment + 2));
}

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelConfig& config,
                                                               int64_t num_pages, int device,
                                                               GpuBackendOptions options) {
  if (std::string unsupported; !gpu::SupportsShape(config.shape(), &unsupported)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the GPU kernels cannot run this model: ", unsupported,
                     "; change the model config or use --backend=cpu"));
  }
  if (gpu::DeviceCount() <= device) {
    return absl::FailedPreconditionError(
        absl::StrCat("no GPU device ", device, " (", gpu::DeviceCount(), " found)"));
  }
  gpu::DeviceInfo info;
  if (gpu::SetDevice(device) != KernelStatus::kOk ||
      gpu::QueryDevice(device, &info) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU device ", device, " is not usable: ", gpu::LastErrorText()));
  }
  if (std::string unsupported; !gpu::SupportsShapeOn(config.shape(), info, &unsupported)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the GPU kernels cannot run this model on ", info.name, ": ", unsupported,
                     "; change the model config or use --backend=cpu"));
  }
  std::unique_ptr<GpuBackend> backend(new GpuBackend(config, num_pages, info, options));
  if (gpu::StreamCreate(&backend->stream_) != KernelStatus::kOk) {
    return backend->DeviceStatus(KernelStatus::kDeviceError, "creating a stream");
  }
  std::vector<void**> events = {&backend->append_uploaded_};
  for (Slot& slot : backend->slots_) {
    for (void*& event : slot.events) events.push_back(&event);
  }
  for (void** event : events) {
    if (gpu::EventCreate(event) != KernelStatus::kOk) {
      return backend->DeviceStatus(KernelStatus::kDeviceError, "creating an event");
    }
  }
  // Recorded once, so that the first append's wait on it returns at once.
  BLOCKSEL_RETURN_IF_ERROR(backend->DeviceStatus(
      gpu::EventRecord(backend->append_uploaded_, backend->stream_), "recording an event"));
  const int64_t pool_bytes = num_pages * config.PageBytes();
  if (gpu::DeviceAlloc(&backend->pool_, pool_bytes) != KernelStatus::kOk) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", pool_bytes, " bytes of GPU memory for the key cache on ",
                     info.name, " (", info.total_memory, " bytes): lower --cache_mib"));
  }
  const int64_t table_bytes = backend->tables_arena_.capacity() * 4;
  if (gpu::DeviceAlloc(&backend->tables_, table_bytes) != KernelStatus::kOk) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate ", table_bytes, " bytes of GPU memory for the block tables on ", info.name,
        ": lower --cache_mib"));
  }
  BLOCKSEL_RETURN_IF_ERROR(backend->CaptureDecodeGraphs());
  return backend;
}

GpuBackend::GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device,
                       GpuBackendOptions options)
    : config_(config),
      num_pages_(num_pages),
      device_(std::move(device)),
      tables_arena_(options.table_arena_entries > 0 ? options.table_arena_entries
                                                    : ArenaCapacity(num_pages)),
      options_(options) {}

GpuBackend::~GpuBackend() {
  if (stream_ != nullptr) (void)gpu::StreamSynchronize(stream_);
  for (Slot& slot : slots_) slot.graphs.clear();
  for (Buffer* device : {&inputs_, &outputs_, &decode_workspace_, &prefill_workspace_, &scores_,
                         &append_inputs_, &graph_inputs_, &graph_workspace_}) {
    gpu::DeviceFree(device->data);
  }
  gpu::DeviceFree(pool_);
  gpu::DeviceFree(tables_);
  gpu::PinnedFree(append_staging_.data);
  gpu::EventDestroy(append_uploaded_);
  for (Slot& slot : slots_) {
    for (Buffer* pinned : {&slot.staging, &slot.results, &slot.graph_upload, &slot.graph_results}) {
      gpu::PinnedFree(pinned->data);
    }
    for (void* event : slot.events) gpu::EventDestroy(event);
  }
  gpu::StreamDestroy(stream_);
}

absl::string_view GpuBackend::name() const {
#if defined(BLOCKSEL_GPU_IS_HIP)
  return "hip";
#else
  return "cuda";
#endif
}

std::string GpuBackend::detail() const {
  return absl::StrCat(device_.name, ", ", device_.multiprocessors, " SMs, cc ",
                      device_.compute_major, ".", device_.compute_minor);
}

absl::Status GpuBackend::DeviceStatus(KernelStatus status, absl::string_view what) const {
  return KernelStatusToStatus(status, what,
                              status == KernelStatus::kDeviceError ? gpu::LastErrorText() : "");
}

absl::Status GpuBackend::Reserve(Buffer* buffer, int64_t bytes, Memory memory) {
  if (buffer->bytes >= bytes) return absl::OkStatus();
  // Work in the stream may still read an old device buffer (a pinned one
  // is only grown while nothing reads it). Growing is rare.
  if (memory == Memory::kDevice) {
    BLOCKSEL_RETURN_IF_ERROR(
        DeviceStatus(gpu::StreamSynchronize(stream_), "waiting to grow a buffer"));
  }
  const bool pinned = memory == Memory::kPinned;
  const int64_t grown = std::max(bytes, buffer->bytes * 2);
  if (pinned) {
    gpu::PinnedFree(buffer->data);
  } else {
    gpu::DeviceFree(buffer->data);
  }
  buffer->data = nullptr;
  buffer->bytes = 0;
  const KernelStatus status =
      pinned ? gpu::PinnedAlloc(&buffer->data, grown) : gpu::DeviceAlloc(&buffer->data, grown);
  if (status != KernelStatus::kOk) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", grown,
                     pinned ? " bytes of pinned host memory" : " bytes of GPU memory"));
  }
  buffer->bytes = grown;
  return absl::OkStatus();
}

absl::Status GpuBackend::ReserveDecodeWorkspace(Buffer* buffer, int64_t bytes) {
  if (buffer->bytes >= bytes) return absl::OkStatus();
  BLOCKSEL_RETURN_IF_ERROR(Reserve(buffer, bytes, Memory::kDevice));
  return DeviceStatus(gpu::ZeroDevice(buffer->data, buffer->bytes, stream_),
                      "clearing the decode workspace");
}

void* GpuBackend::LayerPool(int32_t layer_index) const {
  return static_cast<unsigned char*>(pool_) + layer_index * num_pages_ * config_.LayerPageBytes();
}

int64_t GpuBackend::KeyAddress(const KeyWrite& write) const {
  return reinterpret_cast<int64_t>(LayerPool(write.layer_index)) +
         write.page * config_.LayerPageBytes() + write.first_slot * config_.TokenBytes();
}

absl::Status GpuBackend::Record(Slot& slot, int event) {
  return DeviceStatus(gpu::EventRecord(slot.events[event], stream_), "recording an event");
}

absl::Status GpuBackend::WriteKeys(absl::Span<const KeyWrite> writes) {
  if (writes.empty()) return absl::OkStatus();
  // [header][runs][keys]: one upload, one copy-run launch.
  const int64_t runs = kHeaderBytes;
  int64_t data = runs + AlignUp(static_cast<int64_t>(writes.size()) * sizeof(gpu::CopyRun));
  int64_t end = data;
  for (const KeyWrite& write : writes) end += AlignUp16(write.num_tokens * config_.TokenBytes());
  // The last append's upload must be done reading the staging.
  BLOCKSEL_RETURN_IF_ERROR(
      DeviceStatus(gpu::EventSynchronize(append_uploaded_), "copying keys to the GPU"));
  BLOCKSEL_RETURN_IF_ERROR(Reserve(&append_staging_, end, Memory::kPinned));
  BLOCKSEL_RETURN_IF_ERROR(Reserve(&append_inputs_, end, Memory::kDevice));
  auto* staging = static_cast<unsigned char*>(append_staging_.data);
  const auto device_base = reinterpret_cast<uint64_t>(append_inputs_.data);
  UploadHeader header{};
  header.num_runs = static_cast<int32_t>(writes.size());
  std::memcpy(staging, &header, sizeof(header));
  auto* run = reinterpret_cast<gpu::CopyRun*>(staging + runs);
  for (const KeyWrite& write : writes) {
    const int64_t bytes = write.num_tokens * config_.TokenBytes();
    std::memcpy(staging + data, write.keys, bytes);
    *run++ = {static_cast<uint64_t>(KeyAddress(write)), device_base + data,
              static_cast<uint32_t>(bytes), 0};
    data += AlignUp16(bytes);
  }
  KernelStatus status = gpu::CopyHostToDevice(append_inputs_.data, staging, end, stream_);
  if (status == KernelStatus::kOk) status = gpu::EventRecord(append_uploaded_, stream_);
  if (status == KernelStatus::kOk) {
    auto* inputs = static_cast<unsigned char*>(append_inputs_.data);
    status =
        gpu::LaunchCopyRuns(reinterpret_cast<const gpu::CopyRun*>(inputs + runs),
                            reinterpret_cast<const int32_t*>(inputs + kNumRunsOffset), stream_);
  }
  return DeviceStatus(status, "copying keys to the GPU");
}

absl::Status GpuBackend::ReadKeys(absl::Span<const KeyRead> reads) {
  const int64_t token_bytes = config_.TokenBytes();
  int64_t total = 0;
  for (const KeyRead& read : reads) total += read.num_tokens * token_bytes;
  BLOCKSEL_RETURN_IF_ERROR(
      DeviceStatus(gpu::EventSynchronize(append_uploaded_), "copying keys from the GPU"));
  BLOCKSEL_RETURN_IF_ERROR(Reserve(&append_staging_, total, Memory::kPinned));
  auto* staging = static_cast<unsigned char*>(append_staging_.data);
  int64_t offset = 0;
  for (const KeyRead& read : reads) {
    const int64_t bytes = read.num_tokens * token_bytes;
    const KernelStatus copied = gpu::CopyDeviceToHost(
        staging + offset,
        static_cast<const unsigned char*>(LayerPool(read.layer_index)) +
            read.page * config_.LayerPageBytes() + read.first_slot * token_bytes,
        bytes, stream_);
    if (copied != KernelStatus::kOk) return DeviceStatus(copied, "copying keys from the GPU");
    offset += bytes;
  }
  BLOCKSEL_RETURN_IF_ERROR(
      DeviceStatus(gpu::StreamSynchronize(stream_), "copying keys from the GPU"));
  offset = 0;
  for (const KeyRead& read : reads) {
    std::memcpy(read.keys, staging + offset, read.num_tokens * token_bytes);
    offset += read.num_tokens * token_bytes;
  }
  return absl::OkStatus();
}

GpuBackend::UploadLayout GpuBackend::GraphLayout(int32_t bucket, int32_t tokens) const {
  const SelectionShape shape = config_.shape();
  UploadLayout layout;
  layout.spans = kHeaderBytes;
  layout.queries = layout.spans + AlignUp(int64_t{bucket} * sizeof(gpu::DeviceSpan));
  layout.runs =
      layout.queries + AlignUp(int64_t{bucket} * tokens * shape.num_heads * shape.head_dim * 2);
  // Per request its keys, in at most tokens / kBlockSize + 2 pages, and its
  // new block-table entries; then the pieces of everything.
  layout.run_capacity = static_cast<int32_t>(
      bucket * (tokens / kBlockSize + 3) + (layout.runs + graph_data_capacity_) / kPieceBytes + 1);
  layout.data = layout.runs + AlignUp(int64_t{layout.run_capacity} * sizeof(gpu::CopyRun));
  layout.data_capacity = graph_data_capacity_;
  return layout;
}

gpu::DeviceBatch GpuBackend::GraphBatch(int32_t bucket, int32_t tokens, int32_t* block_ids) const {
  const UploadLayout layout = GraphLayout(bucket, tokens);
  auto* inputs = static_cast<unsigned char*>(graph_inputs_.data);
  gpu::DeviceBatch batch;
  batch.key_pool_ref = reinterpret_cast<const void* const*>(inputs);
  batch.num_pages = num_pages_;
  batch.spans = reinterpret_cast<const gpu::DeviceSpan*>(inputs + layout.spans);
  batch.num_spans = bucket;
  batch.queries = reinterpret_cast<const uint16_t*>(inputs + layout.queries);
  batch.block_table = static_cast<const int32_t*>(tables_);
  batch.total_rows = bucket * tokens;
  batch.block_ids = block_ids;
  batch.workspace = graph_workspace_.data;
  batch.workspace_bytes = graph_workspace_.bytes;
  return batch;
}

absl::Status GpuBackend::CaptureDecodeGraphs() {
  const SelectionShape shape = config_.shape();
  const int32_t max_batch = options_.graph_max_batch;
  const int32_t max_tokens =
      std::min(options_.graph_max_tokens, gpu::kKernelLimits.max_decode_queries / shape.num_heads);
  if (max_batch < 1 || max_tokens < 1 || shape.topk > gpu::kKernelLimits.max_decode_topk)
    return absl::OkStatus();
  const int64_t max_blocks = (config_.max_positions + kBlockSize - 1) / kBlockSize;
  // Keys of every request and every table entry one batch can upload (a
  // table entry is a page of one of the batch's sequences).
  graph_data_capacity_ = int64_t{max_batch} * max_tokens * AlignUp16(config_.TokenBytes()) +
                         std::min(num_pages_, int64_t{max_batch} * max_blocks) * 4 +
                         int64_t{max_batch} * 16;
  const UploadLayout largest = GraphLayout(max_batch, max_tokens);
  // Pages belong to one sequence each, so a batch of distinct sequences
  // scores at most every page once (FindGraph checks each batch).
  graph_scored_capacity_ = std::min(num_pages_, int64_t{max_batch} * max_blocks);
  // Graph (bucket, tokens) runs the decode plan of its largest batch.
  auto graph_plan = [&](int32_t bucket, int32_t tokens, gpu::SelectionPlan* plan) {
    gpu::BatchDims dims;
    dims.num_spans = bucket;
    dims.total_rows = bucket * tokens;
    dims.max_rows_per_span = tokens;
    dims.max_visible_blocks = static_cast<int32_t>(max_blocks);
    dims.scored_blocks = graph_scored_capacity_;
    gpu::PlanOptions decode;
    decode.force_path = true;
    decode.path = gpu::KernelPath::kDecode;
    return DeviceStatus(gpu::Plan(shape, dims, device_, decode, plan), "planning a decode graph");
  };
  gpu::SelectionPlan largest_plan;
  BLOCKSEL_RETURN_IF_ERROR(graph_plan(max_batch, max_tokens, &largest_plan));
  BLOCKSEL_RETURN_IF_ERROR(Reserve(&graph_inputs_, largest.runs, Memory::kDevice));
  BLOCKSEL_RETURN_IF_ERROR(ReserveDecodeWorkspace(&graph_workspace_, largest_plan.workspace_bytes));
  for (Slot& slot : slots_) {
    BLOCKSEL_RETURN_IF_ERROR(
        Reserve(&slot.graph_upload, largest.data + largest.data_capacity, Memory::kPinned));
    BLOCKSEL_RETURN_IF_ERROR(Reserve(
        &slot.graph_results, int64_t{max_batch} * max_tokens * shape.num_heads * shape.topk * 4,
        Memory::kPinned));
    // The graphs reach the pinned buffers at their device addresses.
    BLOCKSEL_RETURN_IF_ERROR(
        DeviceStatus(gpu::DevicePointerOf(slot.graph_upload.data, &slot.graph_upload_device),
                     "mapping pinned memory"));
    BLOCKSEL_RETURN_IF_ERROR(
        DeviceStatus(gpu::DevicePointerOf(slot.graph_results.data, &slot.graph_results_device),
                     "mapping pinned memory"));
    void* const results = slot.graph_results_device;
    auto* runs_base = static_cast<unsigned char*>(slot.graph_upload_device);
    for (int32_t bucket = 1; bucket <= max_batch; bucket *= 2) {
      for (int32_t tokens = 1; tokens <= max_tokens; ++tokens) {
        const UploadLayout layout = GraphLayout(bucket, tokens);
        gpu::SelectionPlan plan;
        BLOCKSEL_RETURN_IF_ERROR(graph_plan(bucket, tokens, &plan));
        auto graph = std::make_unique<gpu::CapturedGraph>();
        KernelStatus status = graph->BeginCapture(stream_);
        if (status == KernelStatus::kOk) {
          status = gpu::LaunchCopyRuns(
              reinterpret_cast<const gpu::CopyRun*>(runs_base + layout.runs),
              reinterpret_cast<const int32_t*>(runs_base + kNumRunsOffset), stream_);
          if (status == KernelStatus::kOk) {
            status = gpu::Select(plan, GraphBatch(bucket, tokens, static_cast<int32_t*>(results)),
                                 stream_);
          }
          const KernelStatus ended = graph->EndCapture(stream_);
          if (status == KernelStatus::kOk) status = ended;
        }
        if (status != KernelStatus::kOk) return DeviceStatus(status, "capturing a decode graph");
        slot.graphs[{bucket, tokens}] = std::move(graph);
      }
    }
  }
  return absl::OkStatus();
}

gpu::CapturedGraph* GpuBackend::FindGraph(Slot& slot, const SelectionBatch& batch,
                                          const gpu::BatchDims& dims, int32_t runs,
                                          int64_t data_bytes, int32_t* bucket, int32_t* tokens) {
  // Graphs return block ids only.
  if (slot.graphs.empty() || batch.num_spans < 1 || batch.block_scores != nullptr) {
    return nullptr;
  }
  *tokens = batch.spans[0].num_rows;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    if (batch.spans[s].num_rows != *tokens) return nullptr;
  }
  if (dims.scored_blocks > graph_scored_capacity_) return nullptr;
  *bucket = 1;
  while (*bucket < batch.num_spans) *bucket *= 2;
  auto it = slot.graphs.find({*bucket, *tokens});
  if (it == slot.graphs.end()) return nullptr;
  const UploadLayout layout = GraphLayout(*bucket, *tokens);
  // Runs may be cut into pieces: count each piece.
  const int64_t most_pieces = runs + (layout.runs + data_bytes) / kPieceBytes + 1;
  if (most_pieces > layout.run_capacity || data_bytes > layout.data_capacity) return nullptr;
  return it->second.get();
}

absl::Status GpuBackend::PlaceTables(const SelectionBatch& batch, absl::Span<const KeyWrite> writes,
                                     std::vector<BlockTableArena::Placement>* placements,
                                     int32_t* runs, int64_t* data_bytes) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    placements->clear();
    *runs = static_cast<int32_t>(writes.size());
    *data_bytes = 0;
    for (const KeyWrite& write : writes) {
      *data_bytes += AlignUp16(write.num_tokens * config_.TokenBytes());
    }
    bool placed = true;
    for (int32_t s = 0; s < batch.num_spans && placed; ++s) {
      const RowSpan& span = batch.spans[s];
      const int32_t blocks = SpanBlocks(span);
      if (span.table_slot < 0 || blocks == 0) {
        placements->push_back({0, blocks});  // nothing to read or to upload
        continue;
      }
      const std::optional<BlockTableArena::Placement> placement =
          tables_arena_.Place(span.table_slot, blocks);
      placed = placement.has_value();
      if (!placed) break;
      placements->push_back(*placement);
      if (placement->resident < blocks) {
        ++*runs;
        *data_bytes += AlignUp16(int64_t{blocks - placement->resident} * 4);
      }
    }
    if (placed) return absl::OkStatus();
    // Placed afresh, every table of this batch goes up whole.
    tables_arena_.Reset();
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("the block tables of this batch do not fit the GPU's table arena of ",
                   tables_arena_.capacity(), " entries; send smaller batches"));
}

int64_t GpuBackend::StageUpload(const UploadLayout& layout, int32_t layer_index,
                                const SelectionBatch& batch, int32_t bucket, int32_t tokens,
                                absl::Span<const KeyWrite> writes,
                                absl::Span<const BlockTableArena::Placement> placements,
                                unsigned char* staging, const unsigned char* source_base,
                                bool to_graph_inputs, const DevicePayload* device) const {
  const SelectionShape shape = config_.shape();
  const int64_t query_bytes =
      static_cast<int64_t>(batch.total_rows) * shape.num_heads * shape.head_dim * 2;
  const auto source = reinterpret_cast<uint64_t>(source_base);
  auto* spans = reinterpret_cast<gpu::DeviceSpan*>(staging + layout.spans);
  const int32_t num_spans = std::max(bucket, batch.num_spans);
  for (int32_t s = 0; s < num_spans; ++s) {
    if (s >= batch.num_spans) {  // a graph's padding
      spans[s] = {-tokens, tokens, s * tokens, 0};
      continue;
    }
    const RowSpan& span = batch.spans[s];
    spans[s] = {span.first_position, span.num_rows, span.first_row,
                static_cast<int32_t>(placements[s].offset)};
  }
  // Device payloads are read in place by the kernels (queries of a direct
  // launch) or by copy runs from where they are.
  if (device == nullptr) std::memcpy(staging + layout.queries, batch.queries, query_bytes);
  auto* const first_run = reinterpret_cast<gpu::CopyRun*>(staging + layout.runs);
  gpu::CopyRun* run = first_run;
  // Bytes at absolute address `from` go to `destination`, in pieces.
  auto add_copy = [&](uint64_t destination, uint64_t from, int64_t bytes) {
    for (int64_t done = 0; done < bytes; done += kPieceBytes) {
      const int64_t piece = std::min(kPieceBytes, bytes - done);
      *run++ = {destination + done, from + done, static_cast<uint32_t>(piece), 0};
    }
  };
  // Bytes at `offset` of the image go to `destination`.
  auto add_run = [&](uint64_t destination, int64_t offset, int64_t bytes) {
    add_copy(destination, source + offset, bytes);
  };
  if (to_graph_inputs) {
    const auto inputs = reinterpret_cast<uint64_t>(graph_inputs_.data);
    if (device == nullptr) {
      add_run(inputs, 0, layout.queries + query_bytes);
    } else {
      add_run(inputs, 0, layout.queries);
      add_copy(inputs + layout.queries, reinterpret_cast<uint64_t>(batch.queries), query_bytes);
    }
  }
  int64_t data = layout.data;
  auto add_data = [&](uint64_t destination, const void* bytes_from, int64_t bytes) {
    std::memcpy(staging + data, bytes_from, bytes);
    add_run(destination, data, bytes);
    data += AlignUp16(bytes);
  };
  for (const KeyWrite& write : writes) {
    const auto destination = static_cast<uint64_t>(KeyAddress(write));
    const int64_t bytes = write.num_tokens * config_.TokenBytes();
    if (device != nullptr) {
      add_copy(destination, reinterpret_cast<uint64_t>(write.keys), bytes);
    } else {
      add_data(destination, write.keys, bytes);
    }
  }
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    const BlockTableArena::Placement& placement = placements[s];
    const int32_t blocks = SpanBlocks(span);
    if (span.table_slot < 0 || placement.resident >= blocks) continue;
    add_data(reinterpret_cast<uint64_t>(static_cast<int32_t*>(tables_) + placement.offset +
                                        placement.resident),
             span.block_table + placement.resident, int64_t{blocks - placement.resident} * 4);
  }
  UploadHeader header{};
  header.key_pool = LayerPool(layer_index);
  header.num_runs = static_cast<int32_t>(run - first_run);
  std::memcpy(staging, &header, sizeof(header));
  return data;
}

absl::Status GpuBackend::LaunchDirect(int32_t layer_index, const SelectionBatch& batch,
                                      const gpu::BatchDims& dims, const UploadLayout& layout,
                                      int32_t runs, const DevicePayload* device) {
  const SelectionShape shape = config_.shape();
  auto* inputs = static_cast<unsigned char*>(inputs_.data);
  if (runs > 0) {
    BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
        gpu::LaunchCopyRuns(reinterpret_cast<const gpu::CopyRun*>(inputs + layout.runs),
                            reinterpret_cast<const int32_t*>(inputs + kNumRunsOffset), stream_),
        "placing keys and block tables"));
  }
  gpu::SelectionPlan plan;
  BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(gpu::Plan(shape, dims, device_, gpu::PlanOptions{}, &plan),
                                        "planning a selection"));
  const int64_t output_bytes =
      static_cast<int64_t>(batch.total_rows) * shape.num_heads * shape.topk * 4;
  BLOCKSEL_RETURN_IF_ERROR(Reserve(&outputs_, output_bytes, Memory::kDevice));
  // Decode and prefill keep their workspaces apart: decode's must stay zero
  // between launches.
  Buffer* workspace =
      plan.path == gpu::KernelPath::kDecode ? &decode_workspace_ : &prefill_workspace_;
  BLOCKSEL_RETURN_IF_ERROR(plan.zero_workspace_once
                               ? ReserveDecodeWorkspace(workspace, plan.workspace_bytes)
                               : Reserve(workspace, plan.workspace_bytes, Memory::kDevice));
  gpu::DeviceBatch device_batch;
  device_batch.key_pool = LayerPool(layer_index);
  device_batch.num_pages = num_pages_;
  device_batch.spans = reinterpret_cast<const gpu::DeviceSpan*>(inputs + layout.spans);
  device_batch.num_spans = batch.num_spans;
  device_batch.block_table = static_cast<const int32_t*>(tables_);
  device_batch.queries = device != nullptr
                             ? batch.queries
                             : reinterpret_cast<const uint16_t*>(inputs + layout.queries);
  device_batch.total_rows = batch.total_rows;
  device_batch.block_ids = static_cast<int32_t*>(outputs_.data);
  device_batch.workspace = workspace->data;
  device_batch.workspace_bytes = workspace->bytes;
  const KernelStatus status = gpu::Select(plan, device_batch, stream_);
  BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(status, "selection kernel"));
  if (batch.block_scores != nullptr) {
    const int64_t score_bytes =
        static_cast<int64_t>(shape.num_heads) * batch.total_rows * batch.max_blocks * 4;
    BLOCKSEL_RETURN_IF_ERROR(Reserve(&scores_, score_bytes, Memory::kDevice));
    BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
        gpu::LaunchBlockScores(shape, device_batch, dims.max_rows_per_span,
                               static_cast<float*>(scores_.data), batch.max_blocks, stream_),
        "block score kernel"));
  }
  return absl::OkStatus();
}

absl::Status GpuBackend::Start(int32_t layer_index, const SelectionBatch& batch,
                               absl::Span<const KeyWrite> writes, const DevicePayload* device) {
  if (pending_ >= kMaxPending) {
    return absl::FailedPreconditionError(
        absl::StrCat("the GPU backend already has ", kMaxPending, " selections pending"));
  }
  const SelectionShape shape = config_.shape();
  Slot& slot = slots_[(oldest_ + pending_) % kMaxPending];
  slot.entered = absl::Now();
  std::vector<BlockTableArena::Placement> placements;
  int32_t runs = 0;
  int64_t data_bytes = 0;
  BLOCKSEL_RETURN_IF_ERROR(PlaceTables(batch, writes, &placements, &runs, &data_bytes));
  int32_t bucket = 0;
  int32_t tokens = 0;
  const gpu::BatchDims dims = DimsOf(shape, batch);
  // A device payload's queries reach a graph's inputs through one more run.
  gpu::CapturedGraph* graph = FindGraph(slot, batch, dims, runs + (device != nullptr ? 1 : 0),
                                        data_bytes, &bucket, &tokens);
  slot.rows = batch.total_rows;
  slot.block_ids = batch.block_ids;
  slot.block_scores = batch.block_scores;
  if (graph != nullptr) {
    // Everything in the one graph: it reads the pinned upload and writes
    // the pinned results.
    slot.mode = LaunchMode::kGraph;
    slot.device_rows = bucket * tokens;
    slot.score_bytes = 0;
    StageUpload(GraphLayout(bucket, tokens), layer_index, batch, bucket, tokens, writes, placements,
                static_cast<unsigned char*>(slot.graph_upload.data),
                static_cast<const unsigned char*>(slot.graph_upload_device),
                /*to_graph_inputs=*/true, device);
    slot.staged = absl::Now();
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 1));
    BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(graph->Replay(stream_), "replaying a decode graph"));
    if (device != nullptr) {
      BLOCKSEL_RETURN_IF_ERROR(
          Deliver(*device, slot.graph_results_device, slot.device_rows, batch.total_rows));
    }
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 3));
  } else {
    slot.mode = LaunchMode::kDirect;
    slot.device_rows = batch.total_rows;
    UploadLayout layout;
    layout.spans = kHeaderBytes;
    layout.queries = layout.spans + AlignUp(int64_t{batch.num_spans} * sizeof(gpu::DeviceSpan));
    layout.runs =
        layout.queries + AlignUp(int64_t{batch.total_rows} * shape.num_heads * shape.head_dim * 2);
    layout.run_capacity = static_cast<int32_t>(runs + data_bytes / kPieceBytes + 1);
    layout.data = layout.runs + AlignUp(int64_t{layout.run_capacity} * sizeof(gpu::CopyRun));
    layout.data_capacity = data_bytes;
    BLOCKSEL_RETURN_IF_ERROR(Reserve(&inputs_, layout.data + data_bytes, Memory::kDevice));
    BLOCKSEL_RETURN_IF_ERROR(Reserve(&slot.staging, layout.data + data_bytes, Memory::kPinned));
    auto* staging = static_cast<unsigned char*>(slot.staging.data);
    const int64_t upload_bytes = StageUpload(
        layout, layer_index, batch, 0, 0, writes, placements, staging,
        static_cast<const unsigned char*>(inputs_.data), /*to_graph_inputs=*/false, device);
    slot.staged = absl::Now();
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 0));
    BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
        gpu::CopyHostToDevice(inputs_.data, staging, upload_bytes, stream_), "uploading a batch"));
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 1));
    BLOCKSEL_RETURN_IF_ERROR(LaunchDirect(layer_index, batch, dims, layout, runs, device));
    if (device != nullptr) {
      BLOCKSEL_RETURN_IF_ERROR(Deliver(*device, outputs_.data, batch.total_rows, batch.total_rows));
    }
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 2));
    const int64_t id_bytes = int64_t{batch.total_rows} * shape.num_heads * shape.topk * 4;
    slot.score_bytes = batch.block_scores == nullptr ? 0
                                                     : static_cast<int64_t>(shape.num_heads) *
                                                           batch.total_rows * batch.max_blocks * 4;
    BLOCKSEL_RETURN_IF_ERROR(Reserve(&slot.results, id_bytes + slot.score_bytes, Memory::kPinned));
    auto* results = static_cast<unsigned char*>(slot.results.data);
    BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
        gpu::CopyDeviceToHost(results, outputs_.data, id_bytes, stream_), "downloading block ids"));
    if (slot.score_bytes > 0) {
      BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
          gpu::CopyDeviceToHost(results + id_bytes, scores_.data, slot.score_bytes, stream_),
          "downloading block scores"));
    }
    BLOCKSEL_RETURN_IF_ERROR(Record(slot, 3));
  }
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    if (batch.spans[s].table_slot >= 0) {
      tables_arena_.MarkResident(batch.spans[s].table_slot, SpanBlocks(batch.spans[s]));
    }
  }
  ++pending_;
  return absl::OkStatus();
}

absl::Status GpuBackend::Deliver(const DevicePayload& device, const void* block_ids,
                                 int32_t computed_rows, int32_t rows) {
  const SelectionShape shape = config_.shape();
  const int64_t row_bytes = int64_t{shape.topk} * 4;
  gpu::DeliveredAnswer answer;
  answer.from = block_ids;
  answer.from_pitch = computed_rows * row_bytes;
  answer.to = device.block_ids;
  answer.to_pitch = rows * row_bytes;
  answer.row_bytes = rows * row_bytes;
  answer.rows = shape.num_heads;
  answer.status = device.status;
  answer.message_bytes = device.message_bytes;
  answer.completion = device.completion;
  answer.answer_flag = device.answer_flag;
  answer.sequence = device.sequence;
  return DeviceStatus(gpu::LaunchDeliverAnswer(answer, stream_), "answering a co-located slot");
}

bool GpuBackend::OldestReady() {
  if (pending_ == 0) return false;
  bool done = false;
  // An error counts as ready: FinishOldest reports it.
  return gpu::EventQuery(slots_[oldest_].events[3], &done) != KernelStatus::kOk || done;
}

absl::StatusOr<SelectionReport> GpuBackend::FinishOldest() {
  if (pending_ == 0) {
    return absl::FailedPreconditionError("no selection is pending on the GPU backend");
  }
  Slot& slot = slots_[oldest_];
  oldest_ = (oldest_ + 1) % kMaxPending;
  --pending_;
  // Spinning: the answer's latency is what the engine waits for.
  for (bool done = false; !done;) {
    BLOCKSEL_RETURN_IF_ERROR(
        DeviceStatus(gpu::EventQuery(slot.events[3], &done), "waiting for a selection"));
  }
  // A graph's time is its whole replay, its copy kernel included; direct
  // launches have their upload copy timed apart.
  const bool graph = slot.mode == LaunchMode::kGraph;
  double upload_seconds = 0;
  double compute_seconds = 0;
  if (!graph) {
    BLOCKSEL_RETURN_IF_ERROR(
        DeviceStatus(gpu::EventElapsedSeconds(slot.events[0], slot.events[1], &upload_seconds),
                     "timing a selection"));
  }
  BLOCKSEL_RETURN_IF_ERROR(DeviceStatus(
      gpu::EventElapsedSeconds(slot.events[1], slot.events[graph ? 3 : 2], &compute_seconds),
      "timing a selection"));
  const SelectionShape shape = config_.shape();
  // [H][device rows][topk] -> [H][rows][topk]: a graph's padding rows
  // follow the batch's in each head.
  const auto* results =
      static_cast<const int32_t*>(graph ? slot.graph_results.data : slot.results.data);
  const int64_t row_ids = int64_t{slot.rows} * shape.topk;
  const int64_t device_row_ids = int64_t{slot.device_rows} * shape.topk;
  for (int32_t head = 0; head < shape.num_heads; ++head) {
    std::memcpy(slot.block_ids + head * row_ids, results + head * device_row_ids, row_ids * 4);
  }
  if (slot.score_bytes > 0) {
    std::memcpy(slot.block_scores, results + shape.num_heads * device_row_ids, slot.score_bytes);
  }
  SelectionReport report;
  report.mode = slot.mode;
  report.upload = (slot.staged - slot.entered) + absl::Seconds(upload_seconds);
  report.compute = absl::Seconds(compute_seconds);
  return report;
}

}  // namespace blocksel
