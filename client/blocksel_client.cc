#include "client/blocksel_client.h"

#include <algorithm>
#include <utility>

#include "absl/random/distributions.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "client/encoding.h"
#include "client/layer_groups.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace blocksel {
namespace {

absl::Status ToAbsl(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace

int32_t SelectResult::at(int32_t head, int32_t row, int32_t slot) const {
  const int64_t index = layout == v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR
                            ? (static_cast<int64_t>(row) * num_heads + head) * topk + slot
                            : (static_cast<int64_t>(head) * total_q + row) * topk + slot;
  return block_ids[index];
}

absl::StatusOr<SelectResult> ToSelectResult(const v1::SelectResponse& response) {
  if (response.has_error()) {
    // The code comes from the wire: an error that says OK, or a code gRPC
    // does not have, is still an error.
    const int32_t code = response.error().code();
    if (code <= 0 || code > static_cast<int32_t>(absl::StatusCode::kUnauthenticated)) {
      return absl::UnknownError(
          absl::StrCat("in-band error with status code ", code, ": ", response.error().message()));
    }
    return absl::Status(static_cast<absl::StatusCode>(code), response.error().message());
  }
  const v1::Selection& selection = response.selection();
  absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(selection);
  if (!ids.ok()) return ids.status();
  SelectResult result;
  result.request_id = response.request_id();
  result.num_heads = static_cast<int32_t>(selection.num_heads());
  result.total_q = static_cast<int32_t>(selection.total_q());
  result.topk = static_cast<int32_t>(selection.topk());
  result.layout = selection.layout();
  result.block_ids = std::move(*ids);
  return result;
}

BlockselClient::BlockselClient(const std::string& target, ClientOptions options)
    : options_(options) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  arguments.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  // A sidecar restarts in seconds: reconnect soon after a failure rather
  // than after gRPC's default first backoff of 1 s.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  channel_ = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
  stub_ = v1::BlockSelector::NewStub(channel_);
}

template <typename Call>
grpc::Status BlockselClient::Retried(Call call) const {
  const absl::Time deadline = absl::Now() + options_.timeout;
  absl::Duration backoff = options_.initial_backoff;
  for (int attempt = 1;; ++attempt) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    grpc::Status status = call(&context);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE || attempt >= options_.max_attempts) {
      return status;
    }
    // Jitter spreads the retries of many clients after one server restart.
    thread_local absl::BitGen random;
    const absl::Duration pause = backoff * absl::Uniform(random, 0.5, 1.0);
    if (absl::Now() + pause >= deadline) return status;
    absl::SleepFor(pause);
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

std::unique_ptr<grpc::ClientContext> BlockselClient::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  return context;
}

absl::StatusOr<v1::GetInfoResponse> BlockselClient::GetInfo() {
  v1::GetInfoResponse response;
  grpc::Status status = Retried([&](grpc::ClientContext* context) {
    return stub_->GetInfo(context, v1::GetInfoRequest(), &response);
  });
  if (!status.ok()) return ToAbsl(status);
  return response;
}

absl::StatusOr<uint64_t> BlockselClient::OpenSequence(uint64_t sequence_id,
                                                      uint32_t lease_seconds) {
  v1::OpenSequenceRequest request;
  request.set_sequence_id(sequence_id);
  request.set_lease_seconds(lease_seconds);
  v1::OpenSequenceResponse response;
  grpc::Status status = stub_->OpenSequence(NewContext().get(), request, &response);
  if (!status.ok()) return ToAbsl(status);
  return response.sequence_id();
}

absl::StatusOr<bool> BlockselClient::ReleaseSequence(uint64_t sequence_id) {
  v1::ReleaseSequenceRequest request;
  request.set_sequence_id(sequence_id);
  v1::ReleaseSequenceResponse response;
  grpc::Status status = Retried([&](grpc::ClientContext* context) {
    return stub_->ReleaseSequence(context, request, &response);
  });
  if (!status.ok()) return ToAbsl(status);
  return response.released();
}

absl::StatusOr<v1::AttachResponse> BlockselClient::Attach(const v1::AttachRequest& request) {
  v1::AttachResponse response;
  grpc::Status status = Retried(
      [&](grpc::ClientContext* context) { return stub_->Attach(context, request, &response); });
  if (!status.ok()) return ToAbsl(status);
  return response;
}

absl::Status BlockselClient::RenewAttachment(uint64_t attachment_id, uint32_t lease_seconds) {
  v1::RenewAttachmentRequest request;
  request.set_attachment_id(attachment_id);
  request.set_lease_seconds(lease_seconds);
  v1::RenewAttachmentResponse response;
  return ToAbsl(Retried([&](grpc::ClientContext* context) {
    return stub_->RenewAttachment(context, request, &response);
  }));
}

absl::Status BlockselClient::Detach(uint64_t attachment_id) {
  v1::DetachRequest request;
  request.set_attachment_id(attachment_id);
  v1::DetachResponse response;
  return ToAbsl(Retried(
      [&](grpc::ClientContext* context) { return stub_->Detach(context, request, &response); }));
}

absl::Status BlockselClient::RenewLease(absl::Span<const uint64_t> sequence_ids) {
  v1::RenewLeaseRequest request;
  request.mutable_sequence_ids()->Add(sequence_ids.begin(), sequence_ids.end());
  v1::RenewLeaseResponse response;
  return ToAbsl(Retried([&](grpc::ClientContext* context) {
    return stub_->RenewLease(context, request, &response);
  }));
}

absl::StatusOr<uint64_t> BlockselClient::AppendKeys(const v1::AppendKeysRequest& request) {
  v1::AppendKeysResponse response;
  grpc::Status status = Retried(
      [&](grpc::ClientContext* context) { return stub_->AppendKeys(context, request, &response); });
  if (!status.ok()) return ToAbsl(status);
  return response.tokens_appended();
}

absl::StatusOr<uint64_t> BlockselClient::StreamAppendKeys(
    absl::Span<const v1::AppendKeysRequest> requests) {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::AppendKeysResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::AppendKeysRequest>> writer =
      stub_->StreamAppendKeys(context.get(), &response);
  for (const v1::AppendKeysRequest& request : requests) {
    if (!writer->Write(request)) break;  // the server ended the call: see Finish
  }
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  if (!status.ok()) return ToAbsl(status);
  return response.tokens_appended();
}

absl::StatusOr<SelectResult> BlockselClient::Select(const v1::SelectRequest& request) {
  v1::SelectResponse response;
  grpc::Status status = Retried(
      [&](grpc::ClientContext* context) { return stub_->Select(context, request, &response); });
  if (!status.ok()) return ToAbsl(status);
  return ToSelectResult(response);
}

absl::StatusOr<v1::WriteSnapshotResponse> BlockselClient::WriteSnapshot() {
  v1::WriteSnapshotResponse response;
  grpc::Status status = Retried([&](grpc::ClientContext* context) {
    return stub_->WriteSnapshot(context, v1::WriteSnapshotRequest(), &response);
  });
  if (!status.ok()) return ToAbsl(status);
  return response;
}

absl::StatusOr<std::unique_ptr<SelectSession>> BlockselClient::StartSelectSession() {
  std::vector<int32_t> selecting_layers;
  std::vector<int32_t> audited_layers;
  const absl::StatusOr<v1::GetInfoResponse> info = GetInfo();
  if (info.ok()) {
    selecting_layers = ReusingSelectingLayers(info->model());
    audited_layers.assign(info->model().audited_layers().begin(),
                          info->model().audited_layers().end());
  }
  std::unique_ptr<SelectSession> session(
      new SelectSession(std::move(selecting_layers), std::move(audited_layers)));
  // A session is long-lived: no deadline on the call itself.
  session->context_ = std::make_unique<grpc::ClientContext>();
  session->stream_ = stub_->StreamSelect(session->context_.get());
  if (session->stream_ == nullptr) {
    return absl::UnavailableError("cannot start a StreamSelect call");
  }
  return session;
}

SelectSession::~SelectSession() {
  if (!closed_ && stream_ != nullptr) {
    context_->TryCancel();
    stream_->Finish().IgnoreError();
  }
}

int64_t SelectSession::ReusedLayer(int64_t layer) const {
  const int64_t source = SelectionSourceOf(selecting_layers_, layer);
  return source == layer ? -1 : source;
}

absl::Status SelectSession::Send(const v1::SelectRequest& request) {
  if (closed_) return absl::FailedPreconditionError("the session is closed");
  if (!selecting_layers_.empty()) {
    const int64_t reused = ReusedLayer(request.layer());
    const bool audit =
        reused >= 0 && std::binary_search(audited_layers_.begin(), audited_layers_.end(),
                                          static_cast<int32_t>(request.layer()));
    {
      // Queued before the write, so the answer never arrives before its entry.
      absl::MutexLock lock(&mutex_);
      pending_.push_back({request.request_id(), request.layer(), reused, audit});
    }
    if (audit) {
      v1::SelectRequest audited = request;
      audited.set_audit(true);
      return Write(audited);
    }
    if (reused >= 0) return absl::OkStatus();  // Receive answers it
  }
  return Write(request);
}

absl::Status SelectSession::Write(const v1::SelectRequest& request) {
  if (!stream_->Write(request)) {
    closed_ = true;
    grpc::Status status = stream_->Finish();
    return status.ok() ? absl::UnavailableError("the server ended the stream") : ToAbsl(status);
  }
  return absl::OkStatus();
}

absl::StatusOr<SelectResult> SelectSession::Receive() {
  if (closed_) return absl::FailedPreconditionError("the session is closed");
  Pending next;
  if (!selecting_layers_.empty()) {
    absl::MutexLock lock(&mutex_);
    mutex_.Await(absl::Condition(
        +[](std::deque<Pending>* pending) { return !pending->empty(); }, &pending_));
    next = pending_.front();
    pending_.pop_front();
    if (next.reused_layer >= 0) {
      if (next.audit) ++audit_replies_to_drop_;
      const auto latest = latest_.find(next.reused_layer);
      if (latest == latest_.end()) {
        // INVALID_ARGUMENT, not FAILED_PRECONDITION: the batch is wrong, the
        // stream is fine (AsyncSelectSession reads the latter as its end).
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", next.layer, " reuses the selection of layer ", next.reused_layer,
                         ", which this session has not selected yet; select layer ",
                         next.reused_layer, " first"));
      }
      absl::StatusOr<SelectResult> reused = latest->second;
      if (reused.ok()) reused->request_id = next.request_id;
      return reused;
    }
  }
  v1::SelectResponse response;
  if (!DropAuditReplies() || !stream_->Read(&response)) {
    closed_ = true;
    grpc::Status status = stream_->Finish();
    return status.ok() ? absl::UnavailableError("the server ended the stream") : ToAbsl(status);
  }
  absl::StatusOr<SelectResult> result = ToSelectResult(response);
  if (!selecting_layers_.empty()) {
    absl::MutexLock lock(&mutex_);
    latest_.insert_or_assign(next.layer, result);
  }
  return result;
}

bool SelectSession::DropAuditReplies() {
  int64_t drop = 0;
  {
    absl::MutexLock lock(&mutex_);
    std::swap(drop, audit_replies_to_drop_);
  }
  v1::SelectResponse reply;
  for (; drop > 0; --drop) {
    if (!stream_->Read(&reply)) return false;
  }
  return true;
}

absl::StatusOr<SelectResult> SelectSession::Call(const v1::SelectRequest& request) {
  absl::Status sent = Send(request);
  if (!sent.ok()) return sent;
  return Receive();
}

absl::Status SelectSession::Close() {
  if (closed_) return absl::OkStatus();
  closed_ = true;
  stream_->WritesDone();
  // Finish expects every reply read, those to audits Receive answered
  // included; a broken stream shows in its status.
  DropAuditReplies();
  return ToAbsl(stream_->Finish());
}

}  // namespace blocksel
