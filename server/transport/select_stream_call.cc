#include "server/transport/select_stream_call.h"

#include <memory>
#include <utility>

#include "server/transport/grpc_handoff.h"

namespace blocksel {
namespace {

void SetError(const absl::Status& status, v1::SelectResponse* response) {
  v1::Error* error = response->mutable_error();
  error->set_code(static_cast<int32_t>(status.code()));
  error->set_message(std::string(status.message()));
}

}  // namespace

void SelectStreamCall::Tag::Proceed(bool ok) {
  // gRPC orders an operation's start before its completion; declared to
  // ThreadSanitizer, which cannot see that through gRPC's core.
  TakeBackFromGrpc(call_);
  (call_->*reaction_)(ok);
}

void SelectStreamCall::Accept(Context* context, grpc::ServerCompletionQueue* queue) {
  new SelectStreamCall(context, queue);
}

bool SelectStreamCall::AwaitNoCalls(const Context& context, absl::Duration limit) {
  const absl::Time give_up = absl::Now() + limit;
  while (context.live_calls.load(std::memory_order_acquire) > 0) {
    if (absl::Now() >= give_up) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

SelectStreamCall::~SelectStreamCall() {
  context_->live_calls.fetch_sub(1, std::memory_order_release);
}

SelectStreamCall::SelectStreamCall(Context* context, grpc::ServerCompletionQueue* queue)
    : context_(context), queue_(queue), stream_(&server_context_) {
  context_->live_calls.fetch_add(1, std::memory_order_relaxed);
  // Before the call starts: the tag comes back when the call is over,
  // cancelled or not.
  server_context_.AsyncNotifyWhenDone(&call_done_);
  HandOffToGrpc(this);
  context_->service->RequestStreamSelect(&server_context_, &stream_, queue_, queue_, &accepted_);
}

void SelectStreamCall::OnAccepted(bool ok) {
  if (!ok) {  // the server is shutting down; the call never started
    delete this;
    return;
  }
  Accept(context_, queue_);
  context_->metrics->OnStreamOpened();
  {
    absl::MutexLock lock(&mutex_);
    reading_ = true;
  }
  HandOffToGrpc(this);
  stream_.Read(&incoming_, &read_done_);
}

void SelectStreamCall::OnReadDone(bool ok) {
  const absl::Time received = absl::Now();
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    reading_ = false;
    if (!ok) {
      reads_done_ = true;  // half-closed by the client, or broken
    } else {
      auto exchange = std::make_shared<Exchange>();
      exchange->request = std::move(incoming_);
      incoming_.Clear();
      exchange->response.set_request_id(exchange->request.request_id());
      exchange->times.received = received;
      Submit(std::move(exchange));
    }
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamCall::Submit(std::shared_ptr<Exchange> exchange) {
  ++inflight_;
  SelectTask task;
  task.request = &exchange->request;
  task.selection = exchange->response.mutable_selection();
  task.times = &exchange->times;
  // A request still queued when its stream is cancelled is skipped: nobody
  // is left to read its answer. `this` outlives the task: the call ends
  // only once inflight_ is back to 0.
  task.admit = [this]() -> absl::Status {
    absl::MutexLock admit_lock(&mutex_);
    return cancelled_ ? absl::CancelledError("the stream was cancelled while this waited")
                      : absl::OkStatus();
  };
  task.done = [this, exchange](absl::Status status) {
    if (!status.ok()) SetError(status, &exchange->response);
    Record(*exchange, status);
    Outgoing outgoing{std::move(exchange->response), std::nullopt};
    if (status.ok()) outgoing.times = exchange->times;
    Complete(std::move(outgoing));
  };
  exchange->times.queued = absl::Now();
  absl::Status queued = context_->batcher->Submit(std::move(task), &order_);
  if (!queued.ok()) {
    SetError(queued, &exchange->response);
    Record(*exchange, queued);
    outgoing_.push_back({std::move(exchange->response), std::nullopt});
  }
}

void SelectStreamCall::Complete(Outgoing outgoing) {
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    if (cancelled_) {
      --inflight_;  // nobody to write to
    } else {
      outgoing_.push_back(std::move(outgoing));
    }
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamCall::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    writing_ = false;
    outgoing_.pop_front();
    --inflight_;
    if (!ok) cancelled_ = true;  // the stream is broken; no write can succeed
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamCall::OnFinished(bool /*ok*/) {
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    finish_done_ = true;
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamCall::OnCallDone(bool /*ok*/) {
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    call_done_seen_ = true;
    if (server_context_.IsCancelled()) cancelled_ = true;
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamCall::Record(const Exchange& exchange, const absl::Status& status) {
  context_->metrics->OnRequest(RpcMethod::kStreamSelect, static_cast<int>(status.code()),
                               absl::Now() - exchange.times.received,
                               static_cast<int64_t>(exchange.request.ByteSizeLong()),
                               static_cast<int64_t>(exchange.response.ByteSizeLong()));
}

void SelectStreamCall::PlanLocked(Actions* actions) {
  if (finish_started_) {
    actions->destroy = finish_done_ && call_done_seen_;
    return;
  }
  if (cancelled_) {
    // Responses that were never started are dropped with their requests.
    const size_t unstarted = outgoing_.size() - (writing_ ? 1 : 0);
    outgoing_.resize(outgoing_.size() - unstarted);
    inflight_ -= static_cast<int>(unstarted);
  } else {
    if (!writing_ && !outgoing_.empty()) {
      writing_ = true;
      actions->write = &outgoing_.front().response;
      actions->write_times = outgoing_.front().times;
    }
    if (!reading_ && !reads_done_ && inflight_ < context_->max_inflight) {
      reading_ = true;
      actions->read = true;
    }
  }
  if ((reads_done_ || cancelled_) && !reading_ && !writing_ && inflight_ == 0) {
    finish_started_ = true;
    actions->finish = true;
    actions->finish_status = cancelled_
                                 ? grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled")
                                 : grpc::Status::OK;
  }
}

void SelectStreamCall::Perform(const Actions& actions) {
  // Only an action planned under mutex_ keeps the call alive once it is
  // released: without one, another thread may already have written the
  // last answer, finished the call and deleted it, so `this` is not
  // touched at all. Once a write is started, its completion may end the
  // call too: nothing of `this` is touched after it.
  if (actions.destroy) {
    ServerMetrics* const metrics = context_->metrics;
    delete this;
    metrics->OnStreamClosed();
    return;
  }
  if (actions.write == nullptr && !actions.read && !actions.finish) return;
  ServerMetrics* const metrics = context_->metrics;
  HandOffToGrpc(this);
  if (actions.read) stream_.Read(&incoming_, &read_done_);
  if (actions.finish) stream_.Finish(actions.finish_status, &finished_);
  if (actions.write != nullptr) {
    stream_.Write(*actions.write, &write_done_);
    // Written: handed to gRPC, which serializes it and starts sending.
    if (actions.write_times.has_value()) {
      SelectTimes times = *actions.write_times;
      times.written = absl::Now();
      metrics->OnSelectStages(times);
    }
  }
}

}  // namespace blocksel
