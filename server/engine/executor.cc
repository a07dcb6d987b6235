#include "server/engine/executor.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace blocksel {

Executor::Executor(Options options)
    : queue_capacity_(options.queue_capacity),
      periodic_(std::move(options.periodic)),
      periodic_interval_(options.periodic_interval),
      poll_(std::move(options.poll)),
      idle_spin_(options.idle_spin),
      observer_(options.observer),
      worker_([this] { WorkerLoop(); }) {}

Executor::~Executor() { Stop(); }

absl::Status Executor::Submit(absl::AnyInvocable<void()> task) {
  absl::MutexLock lock(&mutex_);
  if (stopping_) {
    return absl::UnavailableError("the server is shutting down");
  }
  if (static_cast<int64_t>(queue_.size()) >= queue_capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat("the engine queue is full (", queue_capacity_,
                                                     " operations waiting); retry with backoff"));
  }
  queue_.push_back({std::move(task), absl::Now()});
  wake_.store(true, std::memory_order_release);
  if (observer_ != nullptr) observer_->OnQueueDepth(static_cast<int64_t>(queue_.size()));
  return absl::OkStatus();
}

void Executor::Stop() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
    wake_.store(true, std::memory_order_release);
  }
  if (worker_.joinable()) worker_.join();
}

int64_t Executor::queue_depth() const {
  absl::MutexLock lock(&mutex_);
  return static_cast<int64_t>(queue_.size());
}

bool Executor::TakeTask(bool polling, absl::Time periodic_due, Queued* next) {
  // Polling, the lock is only worth taking when a task may be there.
  if (polling && !wake_.load(std::memory_order_acquire)) return true;
  if (!polling && idle_spin_ > absl::ZeroDuration()) {
    const absl::Time until = absl::Now() + idle_spin_;
    while (!wake_.load(std::memory_order_acquire) && absl::Now() < until) {
    }
  }
  absl::MutexLock lock(&mutex_);
  auto ready = [this]()
                   ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return !queue_.empty() || stopping_; };
  if (!polling) mutex_.AwaitWithDeadline(absl::Condition(&ready), periodic_due);
  if (!queue_.empty()) {
    *next = std::move(queue_.front());
    queue_.pop_front();
    wake_.store(!queue_.empty() || stopping_, std::memory_order_release);
    if (observer_ != nullptr) observer_->OnQueueDepth(static_cast<int64_t>(queue_.size()));
    return true;
  }
  // Pending background work keeps the worker alive through a stop.
  return polling || !stopping_;
}

void Executor::WorkerLoop() {
  absl::Time next_periodic = periodic_ ? absl::Now() + periodic_interval_ : absl::InfiniteFuture();
  for (;;) {
    const bool polling = poll_ && poll_();
    Queued next;
    if (!TakeTask(polling, next_periodic, &next)) return;
    if (next.task) {
      if (observer_ != nullptr) observer_->OnQueueWait(absl::Now() - next.enqueued);
      next.task();
    }
    if (periodic_ && absl::Now() >= next_periodic) {
      periodic_();
      next_periodic = absl::Now() + periodic_interval_;
    }
  }
}

}  // namespace blocksel
