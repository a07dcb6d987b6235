// A StreamSelect call driven by callbacks, for callers that pipeline.
#ifndef BLOCKSEL_CLIENT_ASYNC_SELECT_SESSION_H_
#define BLOCKSEL_CLIENT_ASYNC_SELECT_SESSION_H_

#include <deque>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "blocksel/v1/block_selector.pb.h"
#include "client/blocksel_client.h"

namespace blocksel {

// Send queues a batch and returns once it is written; its callback runs on
// the session's reader thread when the answer arrives, in request order.
// At most max_inflight batches are unanswered: Send waits beyond that,
// which is the backpressure the server's own read-ahead limit asks for.
// Every callback runs exactly once, with the answer, its in-band error, or
// the stream's failure.
//
// Thread-safe: Send may be called from several threads (batches are
// ordered as their calls are).
class AsyncSelectSession {
 public:
  using Callback = absl::AnyInvocable<void(absl::StatusOr<SelectResult>)>;

  static absl::StatusOr<std::unique_ptr<AsyncSelectSession>> Start(BlockselClient& client,
                                                                   int max_inflight = 8);
  // Close()s.
  ~AsyncSelectSession();
  AsyncSelectSession(const AsyncSelectSession&) = delete;
  AsyncSelectSession& operator=(const AsyncSelectSession&) = delete;

  // On error (the stream broke, or the session is closed) done still runs,
  // with that error.
  absl::Status Send(const v1::SelectRequest& request, Callback done);
  // Waits for every answer, half-closes and returns the call's status.
  absl::Status Close();

 private:
  AsyncSelectSession(std::unique_ptr<SelectSession> session, int max_inflight);
  void ReadLoop();

  std::unique_ptr<SelectSession> session_;
  const int max_inflight_;
  absl::Mutex write_mutex_;  // one writer at a time, in call order
  absl::Mutex mutex_;
  std::deque<Callback> waiting_ ABSL_GUARDED_BY(mutex_);
  bool closing_ ABSL_GUARDED_BY(mutex_) = false;
  absl::Status broken_ ABSL_GUARDED_BY(mutex_);
  std::thread reader_;
  bool closed_ = false;
};

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_ASYNC_SELECT_SESSION_H_
