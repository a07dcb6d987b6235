#include "client/gpu_batch_buffers.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel {
namespace {

absl::Status DeviceError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", gpu::LastErrorText()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBatchBuffers>> GpuBatchBuffers::Create(
    const GpuSelectSession& session, int32_t num_heads, int32_t topk) {
  std::unique_ptr<GpuBatchBuffers> buffers(new GpuBatchBuffers());
  buffers->num_heads_ = num_heads;
  buffers->topk_ = topk;
  const colocated::RegionSizes& sizes = session.layout().sizes;
  buffers->sizes_ = sizes;
  void* batch_device = nullptr;
  void* ids = nullptr;
  if (gpu::PinnedAlloc(&buffers->batch_, sizes.metadata_bytes) != KernelStatus::kOk ||
      gpu::DevicePointerOf(buffers->batch_, &batch_device) != KernelStatus::kOk ||
      gpu::DeviceAlloc(&buffers->queries_, sizes.query_bytes) != KernelStatus::kOk ||
      (sizes.key_bytes > 0 &&
       gpu::DeviceAlloc(&buffers->keys_, sizes.key_bytes) != KernelStatus::kOk) ||
      gpu::DeviceAlloc(&ids, sizes.ids_bytes) != KernelStatus::kOk) {
    return DeviceError("allocating a worker's batch buffers");
  }
  buffers->ids_ = static_cast<int32_t*>(ids);
  buffers->selection_.batch = batch_device;
  buffers->selection_.queries = buffers->queries_;
  buffers->selection_.block_ids = buffers->ids_;
  return buffers;
}

GpuBatchBuffers::~GpuBatchBuffers() {
  if (batch_ != nullptr) gpu::PinnedFree(batch_);
  gpu::DeviceFree(queries_);
  gpu::DeviceFree(keys_);
  gpu::DeviceFree(ids_);
}

absl::Status GpuBatchBuffers::Stage(const colocated::SlotBatchHeader& header,
                                    const std::vector<colocated::SlotDecodeRequest>& requests,
                                    const std::string& queries, const std::string& keys,
                                    void* stream) {
  const int64_t batch_bytes =
      static_cast<int64_t>(sizeof(header) + requests.size() * sizeof(requests[0]));
  if (batch_bytes > sizes_.metadata_bytes ||
      static_cast<int64_t>(queries.size()) > sizes_.query_bytes ||
      static_cast<int64_t>(keys.size()) > sizes_.key_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the batch (", batch_bytes, " bytes, ", queries.size(), " of queries, ",
                     keys.size(), " of keys) does not fit the session's slots (",
                     sizes_.metadata_bytes, ", ", sizes_.query_bytes, ", ", sizes_.key_bytes, ")"));
  }
  // The previous selection's post may still read the pinned batch.
  if (gpu::StreamSynchronize(stream) != KernelStatus::kOk) return DeviceError("waiting a stream");
  auto* batch = static_cast<unsigned char*>(batch_);
  std::memcpy(batch, &header, sizeof(header));
  std::memcpy(batch + sizeof(header), requests.data(), requests.size() * sizeof(requests[0]));
  if (gpu::CopyHostToDevice(queries_, queries.data(), static_cast<int64_t>(queries.size()),
                            stream) != KernelStatus::kOk ||
      (!keys.empty() && gpu::CopyHostToDevice(keys_, keys.data(), static_cast<int64_t>(keys.size()),
                                              stream) != KernelStatus::kOk)) {
    return DeviceError("copying a batch to the GPU");
  }
  selection_.batch_bytes = batch_bytes;
  selection_.ids_bytes =
      int64_t{header.num_requests} * header.tokens_per_request * num_heads_ * topk_ * 4;
  selection_.query_bytes = static_cast<int64_t>(queries.size());
  selection_.keys = keys.empty() ? nullptr : keys_;
  selection_.key_bytes = static_cast<int64_t>(keys.size());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> GpuBatchBuffers::FetchIds(void* stream) {
  std::vector<int32_t> ids(static_cast<size_t>(selection_.ids_bytes / 4));
  if (gpu::CopyDeviceToHost(ids.data(), ids_, static_cast<int64_t>(ids.size() * 4), stream) !=
          KernelStatus::kOk ||
      gpu::StreamSynchronize(stream) != KernelStatus::kOk) {
    return DeviceError("copying block ids back");
  }
  return ids;
}

}  // namespace blocksel
