// The reactor of one StreamSelect call.
#ifndef BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_REACTOR_H_
#define BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_REACTOR_H_

#include <deque>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "server/engine/select_batcher.h"
#include "server/engine/select_times.h"
#include "server/metrics/server_metrics.h"

namespace blocksel {

// Reads SelectRequests, runs each through the batcher and writes one
// SelectResponse per request, in request order (the batcher keeps a
// stream's order and the executor is FIFO).
//
// Flow control: at most max_inflight requests are read and not yet written
// back; past that the reactor stops reading, so HTTP/2 flow control pushes
// back on the client. One write is in flight at a time. Requests still
// queued when the stream is cancelled are skipped, not run.
//
// Lifetime: gRPC deletes nothing; OnDone deletes the reactor, and Finish is
// only called once no executor task refers to it (inflight_ == 0).
//
// Concurrency: reactions arrive on gRPC threads and completions on the
// engine's thread; mutex_ guards the state. gRPC calls (StartRead,
// StartWrite, Finish) are made after releasing mutex_.
class SelectStreamReactor final
    : public grpc::ServerBidiReactor<v1::SelectRequest, v1::SelectResponse> {
 public:
  // Each request is recorded in metrics as one StreamSelect request.
  SelectStreamReactor(SelectBatcher* batcher, ServerMetrics* metrics, int max_inflight);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // What to start once mutex_ is released.
  struct Actions {
    bool read = false;
    const v1::SelectResponse* write = nullptr;
    std::optional<SelectTimes> write_times;  // the stage times of the response to write
    bool finish = false;
    grpc::Status finish_status;
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

  void Complete(Outgoing outgoing);
  // Counts one answered request in the metrics.
  void Record(const Exchange& exchange, const absl::Status& status);
  void PlanLocked(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void Perform(const Actions& actions);

  SelectBatcher* const batcher_;
  ServerMetrics* const metrics_;
  const int max_inflight_;
  SelectBatcher::OrderToken order_ ABSL_GUARDED_BY(mutex_);
  v1::SelectRequest incoming_;  // target of the pending read

  absl::Mutex mutex_;
  int inflight_ ABSL_GUARDED_BY(mutex_) = 0;  // read, response not yet written
  bool reading_ ABSL_GUARDED_BY(mutex_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mutex_) = false;
  bool writing_ ABSL_GUARDED_BY(mutex_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mutex_) = false;
  bool finished_ ABSL_GUARDED_BY(mutex_) = false;
  // Responses ready to write; front() is being written while writing_.
  std::deque<Outgoing> outgoing_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_SELECT_STREAM_REACTOR_H_
