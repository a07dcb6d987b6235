// Cross-stream batching: decode selections of one layer that arrive within a
// short window, from any number of streams and unary calls, run as one
// backend launch.
#ifndef BLOCKSEL_SERVER_ENGINE_SELECT_BATCHER_H_
#define BLOCKSEL_SERVER_ENGINE_SELECT_BATCHER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.pb.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"

namespace blocksel {

// One selection to run, and where its answer goes.
struct SelectTask {
  // Must stay valid until done has been called.
  const v1::SelectRequest* request = nullptr;
  v1::Selection* selection = nullptr;  // complete when done gets OK
  // Asked on the engine's thread right before the request runs; a non-OK
  // answer (the call was cancelled or its deadline passed while it waited)
  // skips the request and goes to done. May be empty.
  absl::AnyInvocable<absl::Status()> admit;
  // Called once, on the engine's thread, with the request's status, once
  // the selection is finished. Tasks of one order token are done in the
  // order they were submitted.
  absl::AnyInvocable<void(absl::Status)> done;
  // Optional: stage times; the batcher sets started, the engine the rest of
  // its part. Must stay valid until done has been called.
  SelectTimes* times = nullptr;
  // Optional: a payload in GPU memory (see SelectCall::device). Must stay
  // valid until done has been called.
  const DevicePayload* device = nullptr;
};

// Decode batches without block scores are grouped per layer: the first one
// opens a group and queues one executor task for it; those arriving within
// `window` of it join, up to max_group_rows query rows; when the task runs
// (not before the window has passed, unless the group is full) the whole
// group goes to Engine::SelectMany, which merges it into one launch. Any
// other request is queued on its own. A zero window turns batching off.
//
// Order: a caller that needs its requests to run in submission order (a
// stream) passes the same OrderToken to every Submit; a request then only
// joins a group whose task is queued after the caller's previous one.
//
// Thread-safe. The engine thread waits out at most one window per group,
// so the window bounds the latency batching adds; while it waits it keeps
// finishing the engine's launches, whose answers so do not wait with it.
class SelectBatcher {
 public:
  struct Options {
    absl::Duration window = absl::ZeroDuration();
    int64_t max_group_rows = 4096;
  };
  // Per-caller ordering state; zero-initialized.
  struct OrderToken {
    uint64_t last_ticket = 0;
  };

  SelectBatcher(Engine* engine, Executor* executor, Options options);

  // Queues the task. On error (the executor's RESOURCE_EXHAUSTED or
  // UNAVAILABLE) the task is dropped and done is not called. order may be
  // null (no order to keep).
  absl::Status Submit(SelectTask task, OrderToken* order);

  // Requests submitted to groups, and groups run.
  struct Stats {
    int64_t batched_requests = 0;
    int64_t groups = 0;
  };
  Stats stats() const;

 private:
  struct Group {
    uint64_t ticket = 0;  // position of the group's executor task
    absl::Time opened;
    int64_t rows = 0;
    bool full = false;
    std::vector<SelectTask> tasks;
  };

  bool Batchable(const v1::SelectRequest& request) const;
  // Queues work on the executor and numbers it.
  absl::Status Enqueue(absl::AnyInvocable<void()> work, uint64_t* ticket)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Runs on the engine thread: waits for the window, closes the group and
  // runs it.
  void RunGroup(const std::shared_ptr<Group>& group, uint32_t layer);
  static void RunTasks(Engine* engine, std::vector<SelectTask> tasks);

  Engine* const engine_;
  Executor* const executor_;
  const Options options_;

  mutable absl::Mutex mutex_;
  uint64_t next_ticket_ ABSL_GUARDED_BY(mutex_) = 1;
  // The group of each layer that requests may still join.
  absl::flat_hash_map<uint32_t, std::shared_ptr<Group>> open_groups_ ABSL_GUARDED_BY(mutex_);
  Stats stats_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_SELECT_BATCHER_H_
