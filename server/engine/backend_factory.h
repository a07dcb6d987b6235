// Picks and creates the selection backend at server start.
#ifndef BLOCKSEL_SERVER_ENGINE_BACKEND_FACTORY_H_
#define BLOCKSEL_SERVER_ENGINE_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"

namespace blocksel {

struct BackendOptions {
  // "auto" (a GPU backend built in and a device present, else cpu), "cpu",
  // "cuda" or "hip".
  std::string kind = "auto";
  int cpu_threads = 0;  // 0: one per hardware thread
  int gpu_device = 0;   // device index for cuda / hip
  // Decode graphs captured at start: batch buckets up to this, Q up to
  // gpu_graph_max_tokens (0 disables graphs).
  int gpu_graph_max_batch = 256;
  int gpu_graph_max_tokens = 4;
};

// INVALID_ARGUMENT for an unknown kind, FAILED_PRECONDITION for a GPU kind
// this build or machine cannot run, RESOURCE_EXHAUSTED when the key storage
// cannot be reserved.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options,
                                                       const ModelConfig& model, int64_t num_pages);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_BACKEND_FACTORY_H_
