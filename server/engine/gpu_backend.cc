#include "server/engine/gpu_backend.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace blocksel {
namespace {

int64_t AlignUp(int64_t value) { return (value + 255) / 256 * 256; }

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelConfig& config,
                                                              int64_t num_pages, int device) {
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
  std::unique_ptr<GpuBackend> backend(new GpuBackend(config, num_pages, info));
  if (gpu::StreamCreate(&backend->stream_) != KernelStatus::kOk) {
    return backend->DeviceStatus(KernelStatus::kDeviceError, "creating a stream");
  }
  const int64_t pool_bytes = num_pages * config.PageBytes();
  if (gpu::DeviceAlloc(&backend->pool_, pool_bytes) != KernelStatus::kOk) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate ", pool_bytes, " bytes of GPU memory for the key cache on ", info.name,
        " (", info.total_memory, " bytes): lower --cache_mib"));
  }
  return backend;
}

GpuBackend::GpuBackend(const ModelConfig& config, int64_t num_pages, gpu::DeviceInfo device)
    : config_(config), num_pages_(num_pages), device_(std::move(device)) {}

GpuBackend::~GpuBackend() {
  if (stream_ != nullptr) (void)gpu::StreamSynchronize(stream_);
  gpu::DeviceFree(pool_);
  gpu::DeviceFree(inputs_.data);
  gpu::DeviceFree(outputs_.data);
  gpu::DeviceFree(workspace_.data);
  gpu::PinnedFree(staging_.data);
  gpu::PinnedFree(results_.data);
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
        absl::StrCat("cannot allocate ", grown, pinned ? " bytes of pinned host memory"
                                                       : " bytes of GPU memory"));
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

absl::Status GpuBackend::Select(int32_t layer_index, const SelectionBatch& batch) {
  const SelectionShape shape = config_.shape();
  // Pack spans, the block tables they need, and the queries into one upload.
  std::vector<gpu::DeviceSpan> spans;
  spans.reserve(batch.num_spans);
  std::vector<int32_t> table;
  int32_t max_rows = 1;
  bool fits_decode = shape.topk <= 64;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    const int64_t last = static_cast<int64_t>(span.first_position) + span.num_rows - 1;
    const int64_t blocks = last < 0 ? 0 : last / kBlockSize + 1;
    spans.push_back({span.first_position, span.num_rows, span.first_row,
                     static_cast<int32_t>(table.size())});
    table.insert(table.end(), span.block_table, span.block_table + blocks);
    max_rows = std::max(max_rows, span.num_rows);
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
  KernelStatus status = gpu::CopyHostToDevice(inputs_.data, staging, input_bytes, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "uploading a batch");

  auto* inputs = static_cast<unsigned char*>(inputs_.data);
  gpu::DeviceBatch device_batch;
  device_batch.key_pool = static_cast<unsigned char*>(pool_) +
                          layer_index * num_pages_ * config_.LayerPageBytes();
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
    status = gpu::LaunchPrefill(shape, device_batch, max_rows, stream_);
  }
  if (status != KernelStatus::kOk) return DeviceStatus(status, "selection kernel");
  status = gpu::CopyDeviceToHost(results_.data, outputs_.data, output_bytes, stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "downloading block ids");
  status = gpu::StreamSynchronize(stream_);
  if (status != KernelStatus::kOk) return DeviceStatus(status, "selection");
  std::memcpy(batch.block_ids, results_.data, output_bytes);
  return absl::OkStatus();
}

}  // namespace blocksel
