#include "server/transport/append_stream_reactor.h"

#include "server/transport/status_conversion.h"

namespace blocksel {

AppendStreamReactor::AppendStreamReactor(Engine* engine, Executor* executor,
                                         v1::AppendKeysResponse* response)
    : engine_(engine), executor_(executor), response_(response) {
  StartRead(&incoming_);
}

void AppendStreamReactor::OnReadDone(bool ok) {
  if (!ok) {
    response_->set_tokens_appended(tokens_appended_);
    Finish(grpc::Status::OK);
    return;
  }
  absl::Status queued = executor_->Submit([this] {
    absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(incoming_);
    if (!appended.ok()) {
      Finish(ToGrpcStatus(appended.status()));
      return;
    }
    tokens_appended_ += appended->tokens_appended();
    incoming_.Clear();
    StartRead(&incoming_);
  });
  if (!queued.ok()) Finish(ToGrpcStatus(queued));
}

void AppendStreamReactor::OnDone() { delete this; }

}  // namespace blocksel
