#include "client/async_select_session.h"

#include <utility>

namespace blocksel {

absl::StatusOr<std::unique_ptr<AsyncSelectSession>> AsyncSelectSession::Start(
    BlockselClient& client, int max_inflight) {
  if (max_inflight < 1) return absl::InvalidArgumentError("max_inflight must be >= 1");
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client.StartSelectSession();
  if (!session.ok()) return session.status();
  return std::unique_ptr<AsyncSelectSession>(
      new AsyncSelectSession(*std::move(session), max_inflight));
}

AsyncSelectSession::AsyncSelectSession(std::unique_ptr<SelectSession> session, int max_inflight)
    : session_(std::move(session)), max_inflight_(max_inflight), reader_([this] { ReadLoop(); }) {}

AsyncSelectSession::~AsyncSelectSession() { Close().IgnoreError(); }

absl::Status AsyncSelectSession::Send(const v1::SelectRequest& request, Callback done) {
  absl::MutexLock write_lock(&write_mutex_);
  {
    absl::MutexLock lock(&mutex_);
    auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
      return static_cast<int>(waiting_.size()) < max_inflight_ || !broken_.ok() || closing_;
    };
    mutex_.Await(absl::Condition(&room));
    absl::Status refused =
        closing_ ? absl::FailedPreconditionError("the session is closed") : broken_;
    if (!refused.ok()) {
      done(refused);
      return refused;
    }
    // Queued before the write, so the reader finds it when the answer (or
    // the stream's failure) arrives.
    waiting_.push_back(std::move(done));
  }
  return session_->Send(request);
}

void AsyncSelectSession::ReadLoop() {
  for (;;) {
    {
      absl::MutexLock lock(&mutex_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
        return !waiting_.empty() || closing_;
      };
      mutex_.Await(absl::Condition(&ready));
      if (waiting_.empty()) return;  // closing, every answer delivered
    }
    absl::StatusOr<SelectResult> result = session_->Receive();
    // An in-band error is one request's; any other failure ends the stream
    // and every waiting batch gets it.
    const bool stream_failed = !result.ok() && (absl::IsUnavailable(result.status()) ||
                                                absl::IsFailedPrecondition(result.status()));
    std::deque<Callback> answered;
    {
      absl::MutexLock lock(&mutex_);
      if (stream_failed) {
        broken_ = result.status();
        answered.swap(waiting_);
      } else {
        answered.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
    }
    for (Callback& done : answered) done(result);
    if (stream_failed) {
      absl::MutexLock lock(&mutex_);
      auto closing = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return closing_; };
      mutex_.Await(absl::Condition(&closing));
      return;
    }
  }
}

absl::Status AsyncSelectSession::Close() {
  if (closed_) return absl::OkStatus();
  closed_ = true;
  absl::Status broken;
  {
    absl::MutexLock lock(&mutex_);
    auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
      return waiting_.empty() || !broken_.ok();
    };
    mutex_.Await(absl::Condition(&drained));
    closing_ = true;
    broken = broken_;
  }
  reader_.join();
  absl::Status finished = session_->Close();
  return broken.ok() ? finished : broken;
}

}  // namespace blocksel
