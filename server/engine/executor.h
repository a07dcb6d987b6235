// A single worker thread that runs engine operations in submission order.
#ifndef BLOCKSEL_SERVER_ENGINE_EXECUTOR_H_
#define BLOCKSEL_SERVER_ENGINE_EXECUTOR_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/engine/engine_observer.h"

namespace blocksel {

// Serializes every engine operation on one thread, so the engine, cache and
// backend need no locks and a backend stream sees one caller. The queue is
// bounded: producers (RPC reactors) get RESOURCE_EXHAUSTED instead of
// growing memory without limit.
//
// Between tasks the worker polls for work that finishes in the background
// (the GPU's launches): while some is pending it keeps polling instead of
// sleeping. With nothing pending it spins for idle_spin before it sleeps,
// so a request arriving in a burst starts without a thread wake-up.
//
// Thread-safe.
class Executor {
 public:
  struct Options {
    int64_t queue_capacity = 1024;
    // Run on the worker between tasks, at most once per interval (lease
    // expiry). May be empty.
    absl::AnyInvocable<void()> periodic;
    absl::Duration periodic_interval = absl::Seconds(1);
    // Run on the worker between tasks and while it is idle; finishes what
    // completed in the background and returns whether more is pending.
    // May be empty.
    absl::AnyInvocable<bool()> poll;
    // How long an idle worker checks for new tasks before it sleeps: a
    // sleeping thread takes about 10 us to wake, which a decode step pays
    // per layer. Costs a busy core for this long after each task.
    absl::Duration idle_spin = absl::Microseconds(100);
    // Told each task's queue wait and the queue depth; may be null. Must
    // outlive the executor.
    EngineObserver* observer = nullptr;
  };

  explicit Executor(Options options);
  // Stops (see Stop) and joins the worker.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues task. RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE
  // after Stop; the task is dropped (not run) in both cases.
  absl::Status Submit(absl::AnyInvocable<void()> task);

  // Runs the tasks already queued and finishes what they left pending,
  // refuses new tasks, then joins the worker.
  void Stop();

  int64_t queue_depth() const;

 private:
  struct Queued {
    absl::AnyInvocable<void()> task;
    absl::Time enqueued;
  };

  void WorkerLoop();
  // The next task, or an empty one when there is none yet and `polling`
  // (the caller polls again) or the periodic work is due. Waits otherwise.
  // False once stopping with nothing left to run.
  bool TakeTask(bool polling, absl::Time periodic_due, Queued* next);

  const int64_t queue_capacity_;
  absl::AnyInvocable<void()> periodic_;
  const absl::Duration periodic_interval_;
  absl::AnyInvocable<bool()> poll_;
  const absl::Duration idle_spin_;
  EngineObserver* const observer_;
  mutable absl::Mutex mutex_;
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  // Whether queue_ may hold a task or stopping_ is set: read without the
  // lock by the spinning worker.
  std::atomic<bool> wake_{false};
  std::thread worker_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_EXECUTOR_H_
