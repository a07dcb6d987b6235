#include "server/engine/cpu_backend.h"

#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace blocksel {

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(const ModelConfig& config,
                                                               int64_t num_pages, int num_threads) {
  std::vector<std::unique_ptr<uint8_t[]>> layers;
  const int64_t layer_bytes = num_pages * config.LayerPageBytes();
  for (int32_t l = 0; l < config.num_key_layers(); ++l) {
    // Default-initialized: untouched memory stays uncommitted.
    layers.emplace_back(new (std::nothrow) uint8_t[layer_bytes]);
    if (layers.back() == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot reserve ", layer_bytes * config.num_key_layers(),
                       " bytes of host memory for the key cache; lower --cache_mib"));
    }
  }
  return std::unique_ptr<CpuBackend>(
      new CpuBackend(config, num_pages, num_threads, std::move(layers)));
}

CpuBackend::CpuBackend(const ModelConfig& config, int64_t num_pages, int num_threads,
                       std::vector<std::unique_ptr<uint8_t[]>> layers)
    : config_(config), num_pages_(num_pages), layers_(std::move(layers)), selector_(num_threads) {}

std::string CpuBackend::detail() const {
  return absl::StrCat(cpu::CpuSelector::isa(config_.head_dim), ", ", selector_.num_threads(),
                      " threads");
}

absl::Status CpuBackend::WriteKeys(absl::Span<const KeyWrite> writes) {
  const int64_t token_bytes = config_.TokenBytes();
  const int64_t page_bytes = config_.LayerPageBytes();
  for (const KeyWrite& write : writes) {
    uint8_t* destination =
        layers_[write.layer_index].get() + write.page * page_bytes + write.first_slot * token_bytes;
    std::memcpy(destination, write.keys, write.num_tokens * token_bytes);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ReadKeys(absl::Span<const KeyRead> reads) {
  const int64_t token_bytes = config_.TokenBytes();
  const int64_t page_bytes = config_.LayerPageBytes();
  for (const KeyRead& read : reads) {
    const uint8_t* source =
        layers_[read.layer_index].get() + read.page * page_bytes + read.first_slot * token_bytes;
    std::memcpy(read.keys, source, read.num_tokens * token_bytes);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Start(int32_t layer_index, const SelectionBatch& batch,
                               absl::Span<const KeyWrite> writes, const DevicePayload* device) {
  if (device != nullptr) {
    return absl::FailedPreconditionError(
        "the cpu backend cannot read a payload in GPU memory; run the server with a GPU backend "
        "(--backend=cuda or hip) to serve co-located workers");
  }
  if (finished_.has_value()) {
    return absl::FailedPreconditionError("a selection is already pending on the cpu backend");
  }
  absl::Status written = WriteKeys(writes);
  if (!written.ok()) return written;
  SelectionBatch local = batch;
  local.key_pool = layers_[layer_index].get();
  local.num_pages = num_pages_;
  const absl::Time started = absl::Now();
  absl::Status status =
      KernelStatusToStatus(selector_.Select(config_.shape(), local), "cpu selection");
  if (!status.ok()) return status;
  SelectionReport report;
  report.compute = absl::Now() - started;
  finished_ = report;
  return absl::OkStatus();
}

absl::StatusOr<SelectionReport> CpuBackend::FinishOldest() {
  if (!finished_.has_value()) {
    return absl::FailedPreconditionError("no selection is pending on the cpu backend");
  }
  const SelectionReport report = *finished_;
  finished_.reset();
  return report;
}

}  // namespace blocksel
