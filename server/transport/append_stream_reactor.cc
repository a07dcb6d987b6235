#include "server/transport/append_stream_reactor.h"

#include "server/transport/grpc_handoff.h"
#include "server/transport/status_conversion.h"

namespace blocksel {

AppendStreamReactor::AppendStreamReactor(Engine* engine, Executor* executor, ServerMetrics* metrics,
                                         v1::AppendKeysResponse* response)
    : engine_(engine), executor_(executor), metrics_(metrics), response_(response) {
  metrics_->OnStreamOpened();
  HandOffToGrpc(this);
  StartRead(&incoming_);
}

void AppendStreamReactor::OnReadDone(bool ok) {
  GrpcCallbackScope scope(this);
  if (!ok) {
    response_->set_tokens_appended(tokens_appended_);
    Finish(grpc::Status::OK);
    return;
  }
  const absl::Time arrived = absl::Now();
  absl::Status queued = executor_->Submit([this, arrived] { Apply(arrived); });
  if (!queued.ok()) {
    metrics_->OnRequest(RpcMethod::kStreamAppendKeys, static_cast<int>(queued.code()),
                        absl::Now() - arrived, static_cast<int64_t>(incoming_.ByteSizeLong()), 0);
    Finish(ToGrpcStatus(queued));
  }
}

void AppendStreamReactor::Apply(absl::Time arrived) {
  const int64_t received_bytes = static_cast<int64_t>(incoming_.ByteSizeLong());
  absl::StatusOr<v1::AppendKeysResponse> appended =
      cancelled() ? absl::CancelledError("the stream was cancelled while this message waited")
                  : engine_->AppendKeys(incoming_);
  metrics_->OnRequest(RpcMethod::kStreamAppendKeys, static_cast<int>(appended.status().code()),
                      absl::Now() - arrived, received_bytes, 0);
  if (!appended.ok()) {
    HandOffToGrpc(this);
    Finish(ToGrpcStatus(appended.status()));
    return;
  }
  tokens_appended_ += appended->tokens_appended();
  incoming_.Clear();
  HandOffToGrpc(this);  // after the last write of a member gRPC's next reaction reads
  StartRead(&incoming_);
}

void AppendStreamReactor::OnCancel() {
  GrpcCallbackScope scope(this);
  absl::MutexLock lock(&mutex_);
  cancelled_ = true;
}

bool AppendStreamReactor::cancelled() const {
  absl::MutexLock lock(&mutex_);
  return cancelled_;
}

void AppendStreamReactor::OnDone() {
  TakeBackFromGrpc(this);
  metrics_->OnStreamClosed();
  delete this;
}

}  // namespace blocksel
