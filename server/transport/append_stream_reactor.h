// The reactor of one StreamAppendKeys call.
#ifndef BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_
#define BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"
#include "server/metrics/server_metrics.h"

namespace blocksel {

// Reads one AppendKeysRequest at a time, applies it on the executor, then
// reads the next: a client sending faster than the cache absorbs is held
// back by flow control. The first failing message ends the call with its
// status; messages before it stay applied. A message still queued when the
// call is cancelled is skipped, not applied: its sender has gone and will
// resend from its own state.
//
// Concurrency: exactly one of {a read, an executor task} is outstanding at a
// time, so the members other than cancelled_ need no lock; cancelled_ is set
// by OnCancel on a gRPC thread and read by the task on the engine thread.
// OnDone deletes the reactor.
class AppendStreamReactor final : public grpc::ServerReadReactor<v1::AppendKeysRequest> {
 public:
  // Each message is recorded in metrics as one StreamAppendKeys request.
  AppendStreamReactor(Engine* engine, Executor* executor, ServerMetrics* metrics,
                      v1::AppendKeysResponse* response);

  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // Runs on the engine thread: applies incoming_ unless the call was
  // cancelled, then reads the next message or finishes.
  void Apply(absl::Time arrived);
  bool cancelled() const;

  Engine* const engine_;
  Executor* const executor_;
  ServerMetrics* const metrics_;
  v1::AppendKeysResponse* const response_;
  v1::AppendKeysRequest incoming_;
  uint64_t tokens_appended_ = 0;
  mutable absl::Mutex mutex_;
  bool cancelled_ ABSL_GUARDED_BY(mutex_) = false;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_
