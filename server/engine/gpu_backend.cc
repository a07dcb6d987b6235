#include "server/engine/gpu_backend.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/status_macros.h"

namespace blocksel {
namespace {

int64_t AlignUp(int64_t value) { return (value + 255) / 256 * 256; }

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelConfig& config,
                                                               int64_t num_pages, int device,
                                                               GpuGraphOptions graphs) {
  if (gpu::DeviceCount() <= device) {
    return absl::FailedPreconditionError(
        absl::StrCat("no GPU device ", device, " (", gpu::DeviceCount(), " found)"));
  }
  if (!gpu::SupportsHeadDim(config.head_dim)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "head_dim ", config.head_dim,
        " is not supported by the GPU kernels (powers of two from 16 to 256); use --backend=cpu"));
  }
  gpu::DeviceInfo info;
  if (gpu::SetDevice(device) != KernelStatus::kOk ||
      gpu::QueryDevice(device, &info) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU device ", device, " is not usable: ", gpu::LastErrorText()));
  }
  std::unique_ptr<GpuBackend> backend(new GpuBackend(config, num_pages, info, graphs));
  if (gpu::StreamCreate(&backend->stream_) != KernelStatus::kOk) {
    return backend->DeviceStatus(KernelStatus::kDeviceError, "creating a stream");
  }
  for (void*& event : backend->stage_events_) {
    if (gpu::EventCreate(&event) != KernelStatus::kOk) {
      return backend->DeviceStatus(KernelStatus::kDeviceError, "creating an event");
    }
  }
  const int64_t pool_bytes = num_pages * config.PageBytes();
  if (gpu::DeviceAlloc(&backend->pool_, pool_bytes) != KernelStatus::kOk) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", pool_bytes, " bytes of GPU memory for the key cache on ",
                     info.name, " (", info.total_memory, " bytes): lower --cache_mib"));
  }
  absl::Status captured = backend->CaptureDecodeGraphs();
  if (!captured.ok()) return captured;
  return backend;
}

GpuBackend::GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device,
                       GpuGraphOptions graphs)
    : config_(config), num_pages_(num_pages), device_(std::move(device)), graph_options_(graphs) {}

GpuBackend::~GpuBackend() {
  if (stream_ != nullptr) (void)gpu::StreamSynchronize(stream_);
  gpu::DeviceFree(pool_);
  gpu::DeviceFree(inputs_.data);
  gpu::DeviceFree(outputs_.data);
  gpu::DeviceFree(workspace_.data);
  gpu::DeviceFree(scores_.data);
  graphs_.clear();
  gpu::DeviceFree(graph_inputs_.data);
  gpu::DeviceFree(graph_outputs_.data);
  gpu::DeviceFree(graph_workspace_.data);
  gpu::PinnedFree(staging_.data);
  gpu::PinnedFree(results_.data);
  for (void* event : stage_events_) gpu::EventDestroy(event);
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
  if (status == KernelStatus::kOk) return absl::OkStatus();
  if (status == KernelStatus::kUnsupported) {
    return absl::UnimplementedError(absl::StrCat(what, ": shape not supported on the GPU"));
  }
  return absl::InternalError(absl::StrCat(what, ": ", gpu::LastErrorText()));
}

absl::Status GpuBackend::Reserve(Buffer* buffer, int64_t bytes, bool pinned) {
  if (buffer->bytes >= bytes) return absl::OkStatus();
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

absl::Status GpuBackend::WriteKeys(absl::Span<const KeyWrite> writes) {
  const int64_t token_bytes = config_.TokenBytes();
  int64_t total = 0;
  for (const KeyWrite& write : writes) total += write.num_tokens * token_bytes;
  absl::Status reserved = Reserve(&staging_, total, /*pinned=*/true);
  if (!reserved.ok()) return reserved;
  // Stage everything first, then issue the copies: the pinned bytes stay
  // untouched until the stream has drained.
  auto* staging = static_cast<unsigned char*>(staging_.data);
  int64_t offset = 0;
  const int64_t layer_bytes = num_pages_ * config_.LayerPageBytes();
  for (const KeyWrite& write : writes) {
    const int64_t bytes = write.num_tokens * token_bytes;
    std::memcpy(staging + offset, write.keys, bytes);
    void* destination = static_cast<unsigned char*>(pool_) + write.layer_index * layer_bytes +
                        write.page * config_.LayerPageBytes() + write.first_slot * token_bytes;
    const KernelStatus copied =
        gpu::CopyHostToDevice(destination, staging + offset, bytes, stream_);
    if (copied != KernelStatus::kOk) return DeviceStatus(copied, "copying keys to the GPU");
    offset += bytes;
  }
  return DeviceStatus(gpu::StreamSynchronize(stream_), "copying keys to the GPU");
}

absl::Status GpuBackend::ReadKeys(absl::Span<const KeyRead> reads) {
  const int64_t token_bytes = config_.TokenBytes();
  int64_t total = 0;
  for (const KeyRead& read : reads) total += read.num_tokens * token_bytes;
  absl::Status reserved = Reserve(&staging_, total, /*pinned=*/true);
  if (!reserved.ok()) return reserved;
  auto* staging = static_cast<unsigned char*>(staging_.data);
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
  const KernelStatus synced = gpu::StreamSynchronize(stream_);
  if (synced != KernelStatus::kOk) return DeviceStatus(synced, "copying keys from the GPU");
  offset = 0;
  for (const KeyRead& read : reads) {
    std::memcpy(read.keys, staging + offset, read.num_tokens * token_bytes);
    offset += read.num_tokens * token_bytes;
  }
  return absl::OkStatus();
}

const void* GpuBackend::LayerPool(int32_t layer_index) const {
  return static_cast<unsigned char*>(pool_) + layer_index * num_pages_ * config_.LayerPageBytes();
}

gpu::DeviceBatch GpuBackend::GraphBatch(int32_t bucket, int32_t tokens) const {
  auto* inputs = static_cast<unsigned char*>(graph_inputs_.data);
  gpu::DeviceBatch batch;
  batch.key_pool_ref = reinterpret_cast<const void* const*>(inputs);
  batch.num_pages = num_pages_;
  batch.spans = reinterpret_cast<const gpu::DeviceSpan*>(inputs + graph_layout_.spans);
  batch.num_spans = bucket;
  batch.queries = reinterpret_cast<const uint16_t*>(inputs + graph_layout_.queries);
  batch.block_table = reinterpret_cast<const int32_t*>(inputs + graph_layout_.table);
  batch.total_rows = bucket * tokens;
  batch.block_ids = static_cast<int32_t*>(graph_outputs_.data);
  batch.workspace = graph_workspace_.data;
  return batch;
}

absl::Status GpuBackend::CaptureDecodeGraphs() {
  const SelectionShape shape = config_.shape();
  const int32_t max_batch = graph_options_.max_batch;
  const int32_t max_tokens =
      std::min(graph_options_.max_tokens, gpu::kMaxDecodeQueries / shape.num_heads);
  if (max_batch < 1 || max_tokens < 1 || shape.topk > 64) return absl::OkStatus();
  const int64_t max_blocks = (config_.max_positions + kBlockSize - 1) / kBlockSize;
  graph_layout_.queries =
      graph_layout_.spans + AlignUp(int64_t{max_batch} * sizeof(gpu::DeviceSpan));
  graph_layout_.table = graph_layout_.queries + AlignUp(int64_t{max_batch} * max_tokens *
                                                        shape.num_heads * shape.head_dim * 2);
  graph_layout_.end = graph_layout_.table + int64_t{max_batch} * max_blocks * 4;
  const int32_t splits = gpu::DecodeSplits(device_);
  for (absl::Status reserved :
       {Reserve(&graph_inputs_, graph_layout_.end, false),
        Reserve(&graph_outputs_, int64_t{max_batch} * max_tokens * shape.num_heads * shape.topk * 4,
                false),
        Reserve(&graph_workspace_, gpu::DecodeWorkspaceBytes(shape, max_batch, max_tokens, splits),
                false)}) {
    if (!reserved.ok()) return reserved;
  }
  for (int32_t bucket = 1; bucket <= max_batch; bucket *= 2) {
    for (int32_t tokens = 1; tokens <= max_tokens; ++tokens) {
      auto graph = std::make_unique<gpu::CapturedGraph>();
      KernelStatus status = graph->BeginCapture(stream_);
      if (status == KernelStatus::kOk) {
        status = gpu::LaunchDecode(shape, GraphBatch(bucket, tokens), tokens, splits, stream_);
        const KernelStatus ended = graph->EndCapture(stream_);
        if (status == KernelStatus::kOk) status = ended;
      }
      if (status != KernelStatus::kOk) return DeviceStatus(status, "capturing a decode graph");
      graphs_[{bucket, tokens}] = std::move(graph);
    }
  }
  return absl::OkStatus();
}

gpu::CapturedGraph* GpuBackend::FindGraph(const SelectionBatch& batch, int32_t* bucket,
                                          int32_t* tokens) {
  // Graphs return block ids only.
  if (graphs_.empty() || batch.num_spans < 1 || batch.block_scores != nullptr) return nullptr;
  *tokens = batch.spans[0].num_rows;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    if (batch.spans[s].num_rows != *tokens) return nullptr;
  }
  *bucket = 1;
  while (*bucket < batch.num_spans) *bucket *= 2;
  auto it = graphs_.find({*bucket, *tokens});
  return it == graphs_.end() ? nullptr : it->second.get();
}

absl::StatusOr<SelectionReport> GpuBackend::Select(int32_t layer_index,
                                                   const SelectionBatch& batch) {
  const absl::Time entered = absl::Now();
  int32_t bucket = 0;
  int32_t tokens = 0;
  gpu::CapturedGraph* graph = FindGraph(batch, &bucket, &tokens);
  absl::Time staged;
  absl::Status status = graph != nullptr
                            ? SelectWithGraph(layer_index, batch, graph, bucket, tokens, &staged)
                            : SelectDirect(layer_index, batch, &staged);
  if (!status.ok()) return status;
  // The events have completed: the stream was synchronized.
  double upload_seconds = 0;
  double compute_seconds = 0;
  for (KernelStatus timed :
       {gpu::EventElapsedSeconds(stage_events_[0], stage_events_[1], &upload_seconds),
        gpu::EventElapsedSeconds(stage_events_[1], stage_events_[2], &compute_seconds)}) {
    if (timed != KernelStatus::kOk) return DeviceStatus(timed, "timing a selection");
  }
  SelectionReport report;
  report.mode = graph != nullptr ? LaunchMode::kGraph : LaunchMode::kDirect;
  report.upload = (staged - entered) + absl::Seconds(upload_seconds);
  report.compute = absl::Seconds(compute_seconds);
  return report;
}

absl::Status GpuBackend::MarkStage(int stage) {
  return DeviceStatus(gpu::EventRecord(stage_events_[stage], stream_), "recording an event");
}

absl::Status GpuBackend::SelectWithGraph(int32_t layer_index, const SelectionBatch& batch,
                                         gpu::CapturedGraph* graph, int32_t bucket, int32_t tokens,
                                         absl::Time* staged) {
  const SelectionShape shape = config_.shape();
  // Host image of graph_inputs_ up to the end of the used table: the key
  // pool pointer, bucket spans (padding past the batch), queries, table.
  int64_t table_entries = 0;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    const int64_t last = static_cast<int64_t>(span.first_position) + span.num_rows - 1;
    table_entries += last < 0 ? 0 : last / kBlockSize + 1;
  }
  const int64_t upload = graph_layout_.table + table_entries * 4;
  absl::Status reserved = Reserve(&staging_, upload, true);
  if (!reserved.ok()) return reserved;
  auto* staging = static_cast<unsigned char*>(staging_.data);
  const void* pool = LayerPool(layer_index);
  std::memcpy(staging, &pool, sizeof(pool));
  auto* spans = reinterpret_cast<gpu::DeviceSpan*>(staging + graph_layout_.spans);
  auto* table = reinterpret_cast<int32_t*>(staging + graph_layout_.table);
  int32_t table_offset = 0;
  for (int32_t s = 0; s < bucket; ++s) {
    if (s >= batch.num_spans) {
      spans[s] = {-tokens, tokens, s * tokens, 0};
      continue;
    }
    const RowSpan& span = batch.spans[s];
    const int64_t last = static_cast<int64_t>(span.first_position) + span.num_rows - 1;
    const int32_t blocks = last < 0 ? 0 : static_cast<int32_t>(last / kBlockSize + 1);
    spans[s] = {span.first_position, span.num_rows, s * tokens, table_offset};
    std::memcpy(table + table_offset, span.block_table, blocks * 4);
    table_offset += blocks;
  }
  std::memcpy(staging + graph_layout_.queries, batch.queries,
              static_cast<int64_t>(batch.total_rows) * shape.num_heads * shape.head_dim * 2);
  *staged = absl::Now();
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(0));
  KernelStatus status = gpu::CopyHostToDevice(graph_inputs_.data, staging, upload, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "uploading a batch");
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(1));
  status = graph->Replay(stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "replaying a decode graph");
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(2));
  const int64_t bucket_rows = int64_t{bucket} * tokens;
  const int64_t output_bytes = bucket_rows * shape.num_heads * shape.topk * 4;
  reserved = Reserve(&results_, output_bytes, true);
  if (!reserved.ok()) return reserved;
  status = gpu::CopyDeviceToHost(results_.data, graph_outputs_.data, output_bytes, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "downloading block ids");
  status = gpu::StreamSynchronize(stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "decode graph");
  // [H][bucket rows][topk] -> [H][batch rows][topk]: the first rows of
  // each head are the batch's (spans were laid out in batch order).
  const auto* results = static_cast<const int32_t*>(results_.data);
  const int64_t row_ids = int64_t{batch.total_rows} * shape.topk;
  for (int32_t head = 0; head < shape.num_heads; ++head) {
    std::memcpy(batch.block_ids + head * row_ids, results + head * bucket_rows * shape.topk,
                row_ids * 4);
  }
  return absl::OkStatus();
}

absl::Status GpuBackend::SelectDirect(int32_t layer_index, const SelectionBatch& batch,
                                      absl::Time* staged) {
  const SelectionShape shape = config_.shape();
  // Pack spans, the block tables they need, and the queries into one upload.
  std::vector<gpu::DeviceSpan> spans;
  spans.reserve(batch.num_spans);
  std::vector<int32_t> table;
  int32_t max_rows = 1;
  int32_t max_visible_blocks = 0;
  bool fits_decode = shape.topk <= 64;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    const int64_t last = static_cast<int64_t>(span.first_position) + span.num_rows - 1;
    const int64_t blocks = last < 0 ? 0 : last / kBlockSize + 1;
    spans.push_back(
        {span.first_position, span.num_rows, span.first_row, static_cast<int32_t>(table.size())});
    table.insert(table.end(), span.block_table, span.block_table + blocks);
    max_rows = std::max(max_rows, span.num_rows);
    max_visible_blocks = std::max(max_visible_blocks, static_cast<int32_t>(blocks));
    fits_decode = fits_decode && span.num_rows * shape.num_heads <= gpu::kMaxDecodeQueries;
  }
  const int64_t spans_bytes = AlignUp(static_cast<int64_t>(spans.size()) * sizeof(gpu::DeviceSpan));
  const int64_t table_bytes = AlignUp(static_cast<int64_t>(table.size()) * 4);
  const int64_t query_bytes =
      static_cast<int64_t>(batch.total_rows) * shape.num_heads * shape.head_dim * 2;
  const int64_t input_bytes = spans_bytes + table_bytes + query_bytes;
  const int64_t output_bytes =
      static_cast<int64_t>(batch.total_rows) * shape.num_heads * shape.topk * 4;
  for (absl::Status reserved :
       {Reserve(&staging_, input_bytes, true), Reserve(&inputs_, input_bytes, false),
        Reserve(&results_, output_bytes, true), Reserve(&outputs_, output_bytes, false)}) {
    if (!reserved.ok()) return reserved;
  }
  auto* staging = static_cast<unsigned char*>(staging_.data);
  std::memcpy(staging, spans.data(), spans.size() * sizeof(gpu::DeviceSpan));
  std::memcpy(staging + spans_bytes, table.data(), table.size() * 4);
  std::memcpy(staging + spans_bytes + table_bytes, batch.queries, query_bytes);
  *staged = absl::Now();
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(0));
  KernelStatus status = gpu::CopyHostToDevice(inputs_.data, staging, input_bytes, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "uploading a batch");
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(1));

  auto* inputs = static_cast<unsigned char*>(inputs_.data);
  gpu::DeviceBatch device_batch;
  device_batch.key_pool = LayerPool(layer_index);
  device_batch.num_pages = num_pages_;
  device_batch.spans = reinterpret_cast<const gpu::DeviceSpan*>(inputs);
  device_batch.num_spans = batch.num_spans;
  device_batch.block_table = reinterpret_cast<const int32_t*>(inputs + spans_bytes);
  device_batch.queries = reinterpret_cast<const uint16_t*>(inputs + spans_bytes + table_bytes);
  device_batch.total_rows = batch.total_rows;
  device_batch.block_ids = static_cast<int32_t*>(outputs_.data);
  if (fits_decode) {
    const int32_t splits = gpu::DecodeSplits(device_);
    absl::Status reserved = Reserve(
        &workspace_, gpu::DecodeWorkspaceBytes(shape, batch.num_spans, max_rows, splits), false);
    if (!reserved.ok()) return reserved;
    device_batch.workspace = workspace_.data;
    status = gpu::LaunchDecode(shape, device_batch, max_rows, splits, stream_);
  } else {
    const int32_t key_splits =
        gpu::PrefillKeySplits(device_, shape, batch.num_spans, max_rows, max_visible_blocks);
    absl::Status reserved = Reserve(
        &workspace_, gpu::PrefillWorkspaceBytes(shape, batch.total_rows, key_splits), false);
    if (!reserved.ok()) return reserved;
    device_batch.workspace = workspace_.data;
    status = gpu::LaunchPrefill(shape, device_batch, max_rows, key_splits, stream_);
  }
  if (status != KernelStatus::kOk) return DeviceStatus(status, "selection kernel");
  BLOCKSEL_RETURN_IF_ERROR(MarkStage(2));
  const int64_t score_bytes =
      batch.block_scores == nullptr
          ? 0
          : static_cast<int64_t>(shape.num_heads) * batch.total_rows * batch.max_blocks * 4;
  if (score_bytes > 0) {
    for (absl::Status reserved : {Reserve(&scores_, score_bytes, false),
                                  Reserve(&results_, output_bytes + score_bytes, true)}) {
      if (!reserved.ok()) return reserved;
    }
    status = gpu::LaunchBlockScores(shape, device_batch, max_rows,
                                    static_cast<float*>(scores_.data), batch.max_blocks, stream_);
    if (status != KernelStatus::kOk) return DeviceStatus(status, "block score kernel");
    status = gpu::CopyDeviceToHost(static_cast<unsigned char*>(results_.data) + output_bytes,
                                   scores_.data, score_bytes, stream_);
    if (status != KernelStatus::kOk) return DeviceStatus(status, "downloading block scores");
  }
  status = gpu::CopyDeviceToHost(results_.data, outputs_.data, output_bytes, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "downloading block ids");
  status = gpu::StreamSynchronize(stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "selection");
  std::memcpy(batch.block_ids, results_.data, output_bytes);
  if (score_bytes > 0) {
    std::memcpy(batch.block_scores, static_cast<unsigned char*>(results_.data) + output_bytes,
                score_bytes);
  }
  return absl::OkStatus();
}

}  // namespace blocksel
