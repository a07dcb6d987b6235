// One StreamSelect call, served on a completion queue of the server's own
// polling threads (gRPC's async API). Measured against the callback API on
// the GPU machine, this saves a thread hop per message (bench/RESULTS.md,
// transport_bench).
#ifndef BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_CALL_H_
#define BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_CALL_H_

#include <atomic>
#include <deque>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "grpcpp/server_context.h"
#include "server/engine/select_batcher.h"
#include "server/engine/select_times.h"
#include "server/metrics/server_metrics.h"
#include "server/transport/block_selector_service.h"
#include "server/transport/completion_queue_poller.h"

namespace blocksel {

// Reads SelectRequests, runs each through the batcher and writes one
// SelectResponse per request, in request order (the batcher keeps a
// stream's order and the engine answers in order).
//
// Flow control: at most max_inflight requests are read and not yet written
// back; past that the call stops reading, so HTTP/2 flow control pushes
// back on the client. One write is in flight at a time. Requests still
// queued when the stream is cancelled are skipped, not run.
//
// Threads: completions arrive on the queue's polling thread, answers on the
// engine's thread; mutex_ guards the state, and operations are started
// after releasing it. The call deletes itself once gRPC has reported it
// done, its final status is sent and no engine task refers to it.
class SelectStreamCall {
 public:
  // Where new calls are accepted and what they need; outlives every call.
  struct Context {
    BlockSelectorService* service = nullptr;
    SelectBatcher* batcher = nullptr;
    ServerMetrics* metrics = nullptr;
    int max_inflight = 4;
    // Calls alive, waiting to be accepted or served. A completion queue
    // may only be shut down once this is 0 after the server's shutdown: a
    // call still alive could start an operation on it, which gRPC aborts.
    std::atomic<int> live_calls{0};
  };

  // Waits on `queue` for the next StreamSelect call; once one arrives, the
  // call waits for the one after it, and so on until the server shuts down.
  static void Accept(Context* context, grpc::ServerCompletionQueue* queue);

  // After the server's Shutdown: waits until every call has ended (their
  // queues still served), for at most `limit`. False if some are left.
  static bool AwaitNoCalls(const Context& context, absl::Duration limit);

 private:
  // A completion of one of the call's operations.
  class Tag final : public CompletionHandler {
   public:
    using Reaction = void (SelectStreamCall::*)(bool ok);
    Tag(SelectStreamCall* call, Reaction reaction) : call_(call), reaction_(reaction) {}
    void Proceed(bool ok) override;

   private:
    SelectStreamCall* const call_;
    const Reaction reaction_;
  };

  // A request and its answer while they are in flight.
  struct Exchange {
    v1::SelectRequest request;
    v1::SelectResponse response;
    SelectTimes times;
  };
  // An answer waiting to be written, with its stage times when it is a
  // selection.
  struct Outgoing {
    v1::SelectResponse response;
    std::optional<SelectTimes> times;
  };
  // What to start once mutex_ is released.
  struct Actions {
    bool read = false;
    const v1::SelectResponse* write = nullptr;
    std::optional<SelectTimes> write_times;
    bool finish = false;
    grpc::Status finish_status;
    bool destroy = false;
  };

  SelectStreamCall(Context* context, grpc::ServerCompletionQueue* queue);
  ~SelectStreamCall();

  void OnAccepted(bool ok);
  void OnReadDone(bool ok);
  void OnWriteDone(bool ok);
  void OnFinished(bool ok);
  void OnCallDone(bool ok);
  // An answer from the engine thread.
  void Complete(Outgoing outgoing);
  void Submit(std::shared_ptr<Exchange> exchange) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void Record(const Exchange& exchange, const absl::Status& status);
  void PlanLocked(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Starts what PlanLocked planned, after mutex_ is released; touches
  // `this` only when something was planned (see the definition).
  void Perform(const Actions& actions);

  Context* const context_;
  grpc::ServerCompletionQueue* const queue_;
  grpc::ServerContext server_context_;
  grpc::ServerAsyncReaderWriter<v1::SelectResponse, v1::SelectRequest> stream_;
  Tag accepted_{this, &SelectStreamCall::OnAccepted};
  Tag read_done_{this, &SelectStreamCall::OnReadDone};
  Tag write_done_{this, &SelectStreamCall::OnWriteDone};
  Tag finished_{this, &SelectStreamCall::OnFinished};
  Tag call_done_{this, &SelectStreamCall::OnCallDone};
  v1::SelectRequest incoming_;  // target of the pending read

  absl::Mutex mutex_;
  SelectBatcher::OrderToken order_ ABSL_GUARDED_BY(mutex_);
  int inflight_ ABSL_GUARDED_BY(mutex_) = 0;  // read, response not yet written
  bool reading_ ABSL_GUARDED_BY(mutex_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mutex_) = false;
  bool writing_ ABSL_GUARDED_BY(mutex_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mutex_) = false;
  bool finish_started_ ABSL_GUARDED_BY(mutex_) = false;
  bool finish_done_ ABSL_GUARDED_BY(mutex_) = false;
  bool call_done_seen_ ABSL_GUARDED_BY(mutex_) = false;
  // Responses ready to write; front() is being written while writing_.
  std::deque<Outgoing> outgoing_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_CALL_H_
