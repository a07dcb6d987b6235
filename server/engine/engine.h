// The engine: the index-key cache and a backend behind the API's operations.
#ifndef BLOCKSEL_SERVER_ENGINE_ENGINE_H_
#define BLOCKSEL_SERVER_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.pb.h"
#include "server/engine/backend.h"
#include "server/engine/key_cache.h"
#include "server/engine/model_config.h"
#include "server/engine/snapshot.h"

namespace blocksel {

struct EngineOptions {
  ModelConfig model;
  int64_t num_pages = 0;
  int64_t max_sequences = 65536;
  absl::Duration default_lease = absl::Minutes(10);
  absl::Duration max_lease = absl::Hours(24);
  // Time source for leases; tests substitute a fake clock.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
};

// Every operation validates its request completely before it changes any
// state, so a failed call leaves the cache as it was.
//
// Thread-compatible: calls must be serialized (the server runs them all on
// one Executor thread). Results do not depend on the thread.
class Engine {
 public:
  Engine(EngineOptions options, std::unique_ptr<Backend> backend);

  const ModelConfig& model() const { return options_.model; }
  const EngineOptions& options() const { return options_; }

  absl::StatusOr<v1::OpenSequenceResponse> OpenSequence(const v1::OpenSequenceRequest& request);
  v1::ReleaseSequenceResponse ReleaseSequence(const v1::ReleaseSequenceRequest& request);
  absl::Status RenewLease(const v1::RenewLeaseRequest& request);
  absl::StatusOr<v1::AppendKeysResponse> AppendKeys(const v1::AppendKeysRequest& request);

  // Applies the keys the batch carries, then selects; *selection is
  // complete on OK and untouched otherwise.
  absl::Status Select(const v1::SelectRequest& request, v1::Selection* selection);

  // Model, cache and backend fields of GetInfo.
  void FillInfo(v1::GetInfoResponse* info) const;

  // Releases sequences whose lease ran out; returns how many.
  int64_t ReleaseExpired();

  // See snapshot.h. Loading expects an empty cache (server start).
  absl::StatusOr<SnapshotSummary> WriteSnapshot(const std::string& path);
  absl::StatusOr<SnapshotSummary> LoadSnapshot(const std::string& path);

  CacheStats cache_stats() const { return cache_.stats(); }

 private:
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  KeyCache cache_;
};

// The model config as the API describes it.
v1::ModelConfig ToProto(const ModelConfig& model);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_ENGINE_H_
