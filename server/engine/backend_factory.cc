#include "server/engine/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "server/engine/cpu_backend.h"
#if defined(BLOCKSEL_HAVE_GPU)
#include "kernels/gpu/gpu_selection.h"
#include "server/engine/gpu_backend.h"
#endif

namespace blocksel {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options,
                                                       const ModelConfig& model,
                                                       int64_t num_pages) {
  if (options.kind != "auto" && options.kind != "cpu" && options.kind != "cuda" &&
      options.kind != "hip") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --backend '", options.kind, "': use auto, cpu, cuda or hip"));
  }
#if defined(BLOCKSEL_HAVE_GPU)
#if defined(BLOCKSEL_GPU_IS_HIP)
  constexpr absl::string_view kBuiltGpu = "hip";
#else
  constexpr absl::string_view kBuiltGpu = "cuda";
#endif
  const bool wants_gpu = options.kind == kBuiltGpu;
  if (!wants_gpu && options.kind != "auto" && options.kind != "cpu") {
    return absl::FailedPreconditionError(
        absl::StrCat("--backend=", options.kind, ": this build's GPU backend is ", kBuiltGpu));
  }
  if (wants_gpu || (options.kind == "auto" && gpu::DeviceCount() > 0)) {
    absl::StatusOr<std::unique_ptr<GpuBackend>> gpu_backend =
        GpuBackend::Create(model, num_pages, options.gpu_device,
                           {options.gpu_graph_max_batch, options.gpu_graph_max_tokens, 0});
    if (gpu_backend.ok()) return std::unique_ptr<Backend>(std::move(*gpu_backend));
    // auto falls back to the CPU only where the GPU cannot serve this model.
    if (wants_gpu || !absl::IsFailedPrecondition(gpu_backend.status())) {
      return gpu_backend.status();
    }
  }
#else
  if (options.kind == "cuda" || options.kind == "hip") {
    return absl::FailedPreconditionError(
        absl::StrCat("--backend=", options.kind,
                     ": this build has no GPU backend; use --backend=cpu or --backend=auto"));
  }
#endif
  absl::StatusOr<std::unique_ptr<CpuBackend>> cpu =
      CpuBackend::Create(model, num_pages, options.cpu_threads);
  if (!cpu.ok()) return cpu.status();
  return std::unique_ptr<Backend>(std::move(*cpu));
}

}  // namespace blocksel
