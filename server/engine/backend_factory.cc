#include "server/engine/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "server/engine/cpu_backend.h"

namespace blocksel {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options,
                                                       const ModelConfig& model,
                                                       int64_t num_pages) {
  if (options.kind == "cuda" || options.kind == "hip") {
    return absl::FailedPreconditionError(
        absl::StrCat("--backend=", options.kind,
                     ": this build has no GPU backend; use --backend=cpu or --backend=auto"));
  }
  if (options.kind != "auto" && options.kind != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --backend '", options.kind, "': use auto, cpu, cuda or hip"));
  }
  absl::StatusOr<std::unique_ptr<CpuBackend>> cpu =
      CpuBackend::Create(model, num_pages, options.cpu_threads);
  if (!cpu.ok()) return cpu.status();
  return std::unique_ptr<Backend>(std::move(*cpu));
}

}  // namespace blocksel
