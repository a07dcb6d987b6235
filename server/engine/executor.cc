#include "server/engine/executor.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace blocksel {

Executor::Executor(Options options)
    : queue_capacity_(options.queue_capacity),
      periodic_(std::move(options.periodic)),
      periodic_interval_(options.periodic_interval),
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
  if (observer_ != nullptr) observer_->OnQueueDepth(static_cast<int64_t>(queue_.size()));
  return absl::OkStatus();
}

void Executor::Stop() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
  }
  if (worker_.joinable()) worker_.join();
}

int64_t Executor::queue_depth() const {
  absl::MutexLock lock(&mutex_);
  return static_cast<int64_t>(queue_.size());
}

void Executor::WorkerLoop() {
  absl::Time next_periodic = absl::Now() + periodic_interval_;
  for (;;) {
    absl::AnyInvocable<void()> task;
    absl::Time enqueued;
    {
      absl::MutexLock lock(&mutex_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
        return !queue_.empty() || stopping_;
      };
      mutex_.AwaitWithDeadline(absl::Condition(&ready), next_periodic);
      if (!queue_.empty()) {
        task = std::move(queue_.front().task);
        enqueued = queue_.front().enqueued;
        queue_.pop_front();
        if (observer_ != nullptr) observer_->OnQueueDepth(static_cast<int64_t>(queue_.size()));
      } else if (stopping_) {
        return;
      }
    }
    if (task) {
      if (observer_ != nullptr) observer_->OnQueueWait(absl::Now() - enqueued);
      task();
    }
    if (periodic_ && absl::Now() >= next_periodic) {
      periodic_();
      next_periodic = absl::Now() + periodic_interval_;
    } else if (!periodic_) {
      next_periodic = absl::InfiniteFuture();
    }
  }
}

}  // namespace blocksel
