#include "server/transport/select_stream_reactor.h"

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

SelectStreamReactor::SelectStreamReactor(SelectBatcher* batcher, ServerMetrics* metrics,
                                         int max_inflight)
    : batcher_(batcher), metrics_(metrics), max_inflight_(max_inflight) {
  metrics_->OnStreamOpened();
  {
    absl::MutexLock lock(&mutex_);
    reading_ = true;
  }
  HandOffToGrpc(this);
  StartRead(&incoming_);
}

void SelectStreamReactor::OnReadDone(bool ok) {
  GrpcCallbackScope scope(this);
  const absl::Time received = absl::Now();
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    reading_ = false;
    if (!ok) {
      reads_done_ = true;
    } else {
      // The request and its response live in the task until done.
      auto exchange = std::make_shared<Exchange>();
      exchange->request = std::move(incoming_);
      incoming_.Clear();
      exchange->response.set_request_id(exchange->request.request_id());
      exchange->times.received = received;
      ++inflight_;
      SelectTask task;
      task.request = &exchange->request;
      task.selection = exchange->response.mutable_selection();
      task.times = &exchange->times;
      // A request still queued when its stream is cancelled is skipped:
      // nobody is left to read its answer. `this` outlives the task, since
      // Finish waits for inflight_ to reach 0.
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
      absl::Status queued = batcher_->Submit(std::move(task), &order_);
      if (!queued.ok()) {
        SetError(queued, &exchange->response);
        Record(*exchange, queued);
        outgoing_.push_back({std::move(exchange->response), std::nullopt});
      }
    }
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamReactor::Complete(Outgoing outgoing) {
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

void SelectStreamReactor::OnWriteDone(bool ok) {
  GrpcCallbackScope scope(this);
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

void SelectStreamReactor::OnCancel() {
  GrpcCallbackScope scope(this);
  Actions actions;
  {
    absl::MutexLock lock(&mutex_);
    cancelled_ = true;
    PlanLocked(&actions);
  }
  Perform(actions);
}

void SelectStreamReactor::OnDone() {
  TakeBackFromGrpc(this);
  metrics_->OnStreamClosed();
  delete this;
}

void SelectStreamReactor::Record(const Exchange& exchange, const absl::Status& status) {
  metrics_->OnRequest(RpcMethod::kStreamSelect, static_cast<int>(status.code()),
                      absl::Now() - exchange.times.received,
                      static_cast<int64_t>(exchange.request.ByteSizeLong()),
                      static_cast<int64_t>(exchange.response.ByteSizeLong()));
}

void SelectStreamReactor::PlanLocked(Actions* actions) {
  if (finished_) return;
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
    if (!reading_ && !reads_done_ && inflight_ < max_inflight_) {
      reading_ = true;
      actions->read = true;
    }
  }
  if ((reads_done_ || cancelled_) && !reading_ && !writing_ && inflight_ == 0) {
    finished_ = true;
    actions->finish = true;
    actions->finish_status = cancelled_
                                 ? grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled")
                                 : grpc::Status::OK;
  }
}

void SelectStreamReactor::Perform(const Actions& actions) {
  if (actions.write != nullptr || actions.read || actions.finish) HandOffToGrpc(this);
  if (actions.write != nullptr) {
    StartWrite(actions.write);
    // Written: handed to gRPC, which serializes it and starts sending.
    if (actions.write_times.has_value()) {
      SelectTimes times = *actions.write_times;
      times.written = absl::Now();
      metrics_->OnSelectStages(times);
    }
  }
  if (actions.read) StartRead(&incoming_);
  if (actions.finish) Finish(actions.finish_status);
}

}  // namespace blocksel
