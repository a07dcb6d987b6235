// The reactor of one StreamAppendKeys call.
#ifndef BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_
#define BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_

#include <cstdint>

#include "blocksel/v1/block_selector.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"
#include "server/metrics/server_metrics.h"

namespace blocksel {

// Reads one AppendKeysRequest at a time, applies it on the executor, then
// reads the next: a client sending faster than the cache absorbs is held
// back by flow control. The first failing message ends the call with its
// status; messages before it stay applied.
//
// Concurrency: exactly one of {a read, an executor task} is outstanding at a
// time, so the members need no lock. OnDone deletes the reactor.
class AppendStreamReactor final : public grpc::ServerReadReactor<v1::AppendKeysRequest> {
 public:
  // Each message is recorded in metrics as one StreamAppendKeys request.
  AppendStreamReactor(Engine* engine, Executor* executor, ServerMetrics* metrics,
                      v1::AppendKeysResponse* response);

  void OnReadDone(bool ok) override;
  void OnDone() override;

 private:
  Engine* const engine_;
  Executor* const executor_;
  ServerMetrics* const metrics_;
  v1::AppendKeysResponse* const response_;
  v1::AppendKeysRequest incoming_;
  uint64_t tokens_appended_ = 0;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_APPEND_STREAM_REACTOR_H_
