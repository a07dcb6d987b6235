#include "server/transport/block_selector_service.h"

#include <chrono>
#include <memory>
#include <utility>

#include "server/transport/append_stream_reactor.h"
#include "server/transport/status_conversion.h"

namespace blocksel {

BlockSelectorService::BlockSelectorService(Engine* engine, Executor* executor,
                                           SelectBatcher* batcher, ColocatedHub* colocated,
                                           ServerMetrics* metrics, ServiceOptions options)
    : engine_(engine),
      executor_(executor),
      batcher_(batcher),
      colocated_(colocated),
      metrics_(metrics),
      options_(std::move(options)) {}

namespace {

// Whether a queued unary call is still wanted when its turn comes: work for
// a caller that gave up is skipped, not done.
absl::Status StillWanted(grpc::CallbackServerContext* context) {
  if (context->IsCancelled()) return absl::CancelledError("call cancelled before it ran");
  if (context->deadline() < std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("deadline passed while the call was queued");
  }
  return absl::OkStatus();
}

}  // namespace

void BlockSelectorService::FinishUnary(grpc::ServerUnaryReactor* reactor, RpcMethod method,
                                       absl::Time arrived, const absl::Status& status,
                                       const google::protobuf::Message& request,
                                       const google::protobuf::Message& response) {
  metrics_->OnRequest(method, static_cast<int>(status.code()), absl::Now() - arrived,
                      static_cast<int64_t>(request.ByteSizeLong()),
                      status.ok() ? static_cast<int64_t>(response.ByteSizeLong()) : 0);
  reactor->Finish(ToGrpcStatus(status));
}

template <typename Operation>
grpc::ServerUnaryReactor* BlockSelectorService::RunUnary(grpc::CallbackServerContext* context,
                                                         RpcMethod method,
                                                         const google::protobuf::Message* request,
                                                         const google::protobuf::Message* response,
                                                         Operation operation) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time arrived = absl::Now();
  absl::Status queued = executor_->Submit([this, context, reactor, method, arrived, request,
                                           response, operation = std::move(operation)]() mutable {
    absl::Status wanted = StillWanted(context);
    FinishUnary(reactor, method, arrived, wanted.ok() ? operation() : wanted, *request, *response);
  });
  if (!queued.ok()) FinishUnary(reactor, method, arrived, queued, *request, *response);
  return reactor;
}

grpc::ServerUnaryReactor* BlockSelectorService::GetInfo(grpc::CallbackServerContext* context,
                                                        const v1::GetInfoRequest* request,
                                                        v1::GetInfoResponse* response) {
  return RunUnary(context, RpcMethod::kGetInfo, request, response, [this, response] {
    engine_->FillInfo(response);
    response->set_server_version(options_.server_version);
    response->set_max_message_bytes(options_.max_message_bytes);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockSelectorService::OpenSequence(grpc::CallbackServerContext* context,
                                                             const v1::OpenSequenceRequest* request,
                                                             v1::OpenSequenceResponse* response) {
  return RunUnary(context, RpcMethod::kOpenSequence, request, response, [this, request, response] {
    absl::StatusOr<v1::OpenSequenceResponse> opened = engine_->OpenSequence(*request);
    if (!opened.ok()) return opened.status();
    *response = std::move(*opened);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockSelectorService::ReleaseSequence(
    grpc::CallbackServerContext* context, const v1::ReleaseSequenceRequest* request,
    v1::ReleaseSequenceResponse* response) {
  return RunUnary(context, RpcMethod::kReleaseSequence, request, response,
                  [this, request, response] {
                    *response = engine_->ReleaseSequence(*request);
                    return absl::OkStatus();
                  });
}

grpc::ServerUnaryReactor* BlockSelectorService::RenewLease(grpc::CallbackServerContext* context,
                                                           const v1::RenewLeaseRequest* request,
                                                           v1::RenewLeaseResponse* response) {
  return RunUnary(context, RpcMethod::kRenewLease, request, response,
                  [this, request] { return engine_->RenewLease(*request); });
}

grpc::ServerUnaryReactor* BlockSelectorService::AppendKeys(grpc::CallbackServerContext* context,
                                                           const v1::AppendKeysRequest* request,
                                                           v1::AppendKeysResponse* response) {
  return RunUnary(context, RpcMethod::kAppendKeys, request, response, [this, request, response] {
    absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(*request);
    if (!appended.ok()) return appended.status();
    *response = std::move(*appended);
    return absl::OkStatus();
  });
}

grpc::ServerReadReactor<v1::AppendKeysRequest>* BlockSelectorService::StreamAppendKeys(
    grpc::CallbackServerContext* /*context*/, v1::AppendKeysResponse* response) {
  return new AppendStreamReactor(engine_, executor_, metrics_, response);
}

grpc::ServerUnaryReactor* BlockSelectorService::Select(grpc::CallbackServerContext* context,
                                                       const v1::SelectRequest* request,
                                                       v1::SelectResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto times = std::make_shared<SelectTimes>();
  times->received = absl::Now();
  response->set_request_id(request->request_id());
  SelectTask task;
  task.request = request;
  task.selection = response->mutable_selection();
  task.times = times.get();
  task.admit = [context] { return StillWanted(context); };
  task.done = [this, reactor, times, request, response](absl::Status status) {
    // A unary answer counts as written once it is handed to gRPC.
    times->written = absl::Now();
    if (status.ok()) metrics_->OnSelectStages(*times);
    FinishUnary(reactor, RpcMethod::kSelect, times->received, status, *request, *response);
  };
  times->queued = absl::Now();
  absl::Status queued = batcher_->Submit(std::move(task), /*order=*/nullptr);
  if (!queued.ok()) {
    FinishUnary(reactor, RpcMethod::kSelect, times->received, queued, *request, *response);
  }
  return reactor;
}

grpc::ServerUnaryReactor* BlockSelectorService::WriteSnapshot(
    grpc::CallbackServerContext* context, const v1::WriteSnapshotRequest* request,
    v1::WriteSnapshotResponse* response) {
  return RunUnary(context, RpcMethod::kWriteSnapshot, request, response, [this, response] {
    if (options_.snapshot_path.empty()) {
      return absl::FailedPreconditionError(
          "this server has no --snapshot_path; start it with one to write snapshots");
    }
    absl::StatusOr<SnapshotSummary> written = engine_->WriteSnapshot(options_.snapshot_path);
    if (!written.ok()) return written.status();
    response->set_path(options_.snapshot_path);
    response->set_sequences(written->sequences);
    response->set_bytes(written->bytes);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockSelectorService::Attach(grpc::CallbackServerContext* context,
                                                       const v1::AttachRequest* request,
                                                       v1::AttachResponse* response) {
  const absl::Time arrived = absl::Now();
  absl::StatusOr<v1::AttachResponse> attached = colocated_->Attach(*request);
  if (attached.ok()) *response = std::move(*attached);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishUnary(reactor, RpcMethod::kAttach, arrived, attached.status(), *request, *response);
  return reactor;
}

grpc::ServerUnaryReactor* BlockSelectorService::RenewAttachment(
    grpc::CallbackServerContext* context, const v1::RenewAttachmentRequest* request,
    v1::RenewAttachmentResponse* response) {
  const absl::Time arrived = absl::Now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishUnary(reactor, RpcMethod::kRenewAttachment, arrived, colocated_->Renew(*request), *request,
              *response);
  return reactor;
}

grpc::ServerUnaryReactor* BlockSelectorService::Detach(grpc::CallbackServerContext* context,
                                                       const v1::DetachRequest* request,
                                                       v1::DetachResponse* response) {
  const absl::Time arrived = absl::Now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishUnary(reactor, RpcMethod::kDetach, arrived, colocated_->Detach(*request), *request,
              *response);
  return reactor;
}

}  // namespace blocksel
