// The engine: the index-key cache and a backend behind the API's operations.
#ifndef BLOCKSEL_SERVER_ENGINE_ENGINE_H_
#define BLOCKSEL_SERVER_ENGINE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "blocksel/v1/block_selector.pb.h"
#include "server/engine/backend.h"
#include "server/engine/engine_observer.h"
#include "server/engine/key_cache.h"
#include "server/engine/model_config.h"
#include "server/engine/reuse_audit.h"
#include "server/engine/select_plan.h"
#include "server/engine/select_times.h"
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
  // Told about selections, appends and the cache; may be null. Must outlive
  // the engine.
  EngineObserver* observer = nullptr;
};

// One request of SelectMany and its outcome.
struct SelectCall {
  const v1::SelectRequest* request = nullptr;
  v1::Selection* selection = nullptr;  // complete on OK, untouched otherwise
  absl::Status status;
  // Optional: the engine sets planned, upload, compute and downloaded.
  SelectTimes* times = nullptr;
  // Optional: the request's queries and keys are in GPU memory and its
  // block ids go there (a co-located worker's slot); request.queries and
  // the requests' keys fields are then empty, and selection may be null.
  const DevicePayload* device = nullptr;
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

  // Applies the keys the batch carries, then selects, waiting for the
  // answer; *selection is complete on OK and untouched otherwise.
  absl::Status Select(const v1::SelectRequest& request, v1::Selection* selection);

  // Runs every call as Select would, in order, with as few backend launches
  // as keep that equivalence: consecutive calls share a launch unless a call
  // reads a sequence already in the launch (its appends could change what
  // the earlier call sees), asks for block scores (which come back per
  // launch) or has a device payload (whose answer goes to its own slot). Each call is validated on
  // its own, so a bad one fails alone.
  //
  // Returns once every call is validated and its launch started; `done`
  // runs (on this thread, from SelectMany or FinishSelections) once every
  // call has its status and selection. The calls, their requests and
  // selections must stay valid until then. The done callbacks of
  // successive SelectMany calls run in the order of those calls.
  void SelectMany(absl::Span<SelectCall> calls, absl::AnyInvocable<void()> done);

  // Finishes the started launches whose device work is done (all of them,
  // waiting, when wait is true), oldest first, and runs the done callbacks
  // that are due. Returns whether launches remain unfinished.
  bool FinishSelections(bool wait);

  // Backend selections run so far (a merged launch counts once).
  int64_t select_launches() const { return select_launches_.load(std::memory_order_relaxed); }

  // Tells the observer the cache's state (after a load, say).
  void ReportCache() const;

  // Model, cache and backend fields of GetInfo.
  void FillInfo(v1::GetInfoResponse* info) const;

  // Releases sequences whose lease ran out; returns how many.
  int64_t ReleaseExpired();

  // See snapshot.h. Loading expects an empty cache (server start).
  absl::StatusOr<SnapshotSummary> WriteSnapshot(const std::string& path);
  absl::StatusOr<SnapshotSummary> LoadSnapshot(const std::string& path);

  CacheStats cache_stats() const { return cache_.stats(); }

 private:
  struct PreparedCall {
    SelectCall* call;
    SelectPlan plan;
  };
  // A launch started on the backend and what finishing it needs.
  struct StartedLaunch {
    std::vector<PreparedCall> calls;
    std::vector<int32_t> head_major;  // the backend writes [H, total_rows, topk]
    std::string block_scores;         // [H, total_rows, max_blocks] when asked for
    int32_t max_blocks = 0;
    int32_t total_rows = 0;
    bool prefill = false;
    absl::Time started;
    uint64_t group = 0;  // the SelectMany it belongs to
  };
  // One SelectMany and the launches of it not yet finished.
  struct PendingGroup {
    uint64_t id = 0;
    int unfinished = 0;
    absl::AnyInvocable<void()> done;
  };

  // Validates a request; nothing changes.
  absl::StatusOr<SelectPlan> PlanChecked(const v1::SelectRequest& request,
                                         const DevicePayload* device) const;
  // Starts one backend selection over the prepared calls, whose cache
  // bookkeeping is done and whose keys are `writes`; on failure sets every
  // call's status.
  void Launch(std::vector<PreparedCall> calls, absl::Span<const KeyWrite> writes, uint64_t group);
  // Finishes the oldest started launch (waiting for it): statuses,
  // selections, stage times, metrics, and the reuse audit's part.
  void FinishOldest();
  // The reuse audit of one finished call: compares an audited layer's
  // selection with its source's and tells the observer, or remembers a
  // source layer's decode selection.
  void AuditRows(const PreparedCall& prepared, const StartedLaunch& launch, int32_t first_row);
  // Runs, in order, the done callbacks of the leading groups that are
  // complete.
  void RunDueCallbacks();
  // Applies appends and tells the observer; with `deferred`, the keys are
  // left for the launch that carries them.
  absl::Status AppendToCache(absl::Span<const KeyRange> ranges,
                             std::vector<KeyWrite>* deferred = nullptr);

  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  KeyCache cache_;
  ReuseAudit audit_;
  std::deque<StartedLaunch> started_;  // in the backend's order
  std::deque<PendingGroup> groups_;    // in SelectMany order
  uint64_t next_group_ = 1;
  // Written on the engine's thread, read by monitoring on any thread.
  std::atomic<int64_t> select_launches_{0};
};

// The model config as the API describes it.
v1::ModelConfig ToProto(const ModelConfig& model);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_ENGINE_H_
