// The CPU backend: keys in host memory, selection by CpuSelector.
#ifndef BLOCKSEL_SERVER_ENGINE_CPU_BACKEND_H_
#define BLOCKSEL_SERVER_ENGINE_CPU_BACKEND_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/cpu_selector.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"

namespace blocksel {

class CpuBackend final : public Backend {
 public:
  // Reserves num_pages pages per sparse layer. The memory is not touched
  // here, so the operating system commits it page by page as keys arrive.
  // RESOURCE_EXHAUSTED when the reservation fails.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(const ModelConfig& config,
                                                            int64_t num_pages, int num_threads);

  absl::string_view name() const override { return "cpu"; }
  std::string detail() const override;
  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override;
  absl::Status ReadKeys(absl::Span<const KeyRead> reads) override;
  // Runs the whole selection in Start: one is pending at most, and always
  // ready.
  absl::Status Start(int32_t layer_index, const SelectionBatch& batch,
                     absl::Span<const KeyWrite> writes, const DevicePayload* device) override;
  int pending() const override { return finished_.has_value() ? 1 : 0; }
  int max_pending() const override { return 1; }
  bool OldestReady() override { return true; }
  absl::StatusOr<SelectionReport> FinishOldest() override;

 private:
  CpuBackend(const ModelConfig& config, int64_t num_pages, int num_threads,
             std::vector<std::unique_ptr<uint8_t[]>> layers);

  const ModelConfig config_;
  const int64_t num_pages_;
  std::vector<std::unique_ptr<uint8_t[]>> layers_;  // one pool per sparse layer
  cpu::CpuSelector selector_;
  std::optional<SelectionReport> finished_;  // the selection Start ran
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_CPU_BACKEND_H_
