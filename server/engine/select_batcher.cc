#include "server/engine/select_batcher.h"

#include <algorithm>
#include <memory>
#include <utility>

namespace blocksel {
namespace {

// Query rows of a decode batch: the sum of its requests' Q.
int64_t DecodeRows(const v1::DecodeBatch& batch) {
  const int64_t batch_q = batch.tokens_per_request() == 0 ? 1 : batch.tokens_per_request();
  int64_t rows = 0;
  for (const v1::DecodeRequest& request : batch.requests()) {
    rows += request.query_tokens() == 0 ? batch_q : request.query_tokens();
  }
  return rows;
}

}  // namespace

SelectBatcher::SelectBatcher(Engine* engine, Executor* executor, Options options)
    : engine_(engine), executor_(executor), options_(options) {}

bool SelectBatcher::Batchable(const v1::SelectRequest& request) const {
  return options_.window > absl::ZeroDuration() && request.has_decode() &&
         !request.return_block_scores();
}

absl::Status SelectBatcher::Enqueue(absl::AnyInvocable<void()> work, uint64_t* ticket) {
  absl::Status queued = executor_->Submit(std::move(work));
  if (queued.ok()) *ticket = next_ticket_++;
  return queued;
}

absl::Status SelectBatcher::Submit(SelectTask task, OrderToken* order) {
  OrderToken unordered;
  if (order == nullptr) order = &unordered;
  absl::MutexLock lock(&mutex_);
  if (!Batchable(*task.request)) {
    std::vector<SelectTask> alone;
    alone.push_back(std::move(task));
    return Enqueue([engine = engine_,
                    alone = std::move(alone)]() mutable { RunTasks(engine, std::move(alone)); },
                   &order->last_ticket);
  }

  const uint32_t layer = task.request->layer();
  const int64_t rows = DecodeRows(task.request->decode());
  auto open = open_groups_.find(layer);
  std::shared_ptr<Group> group;
  if (open != open_groups_.end() && open->second->ticket >= order->last_ticket &&
      open->second->rows + rows <= options_.max_group_rows) {
    group = open->second;
  } else {
    group = std::make_shared<Group>();
    group->opened = absl::Now();
    absl::Status queued = Enqueue([this, group, layer] { RunGroup(group, layer); }, &group->ticket);
    if (!queued.ok()) return queued;
    // The group it replaces keeps its members and runs at its turn.
    open_groups_[layer] = group;
  }
  group->rows += rows;
  group->tasks.push_back(std::move(task));
  order->last_ticket = group->ticket;
  ++stats_.batched_requests;
  if (group->rows >= options_.max_group_rows) {
    group->full = true;  // wakes RunGroup if it is waiting
    open_groups_.erase(layer);
  }
  return absl::OkStatus();
}

void SelectBatcher::RunGroup(const std::shared_ptr<Group>& group, uint32_t layer) {
  // The window is waited out in short steps, finishing the engine's
  // launches in between, so that their answers do not wait for it too.
  constexpr absl::Duration kFinishEvery = absl::Microseconds(5);
  const absl::Time close_at = group->opened + options_.window;
  std::vector<SelectTask> tasks;
  for (;;) {
    {
      absl::MutexLock lock(&mutex_);
      const bool full = mutex_.AwaitWithDeadline(absl::Condition(&group->full),
                                                 std::min(close_at, absl::Now() + kFinishEvery));
      if (full || absl::Now() >= close_at) {
        auto open = open_groups_.find(layer);
        if (open != open_groups_.end() && open->second == group) open_groups_.erase(open);
        tasks = std::move(group->tasks);
        ++stats_.groups;
        break;
      }
    }
    engine_->FinishSelections(/*wait=*/false);
  }
  RunTasks(engine_, std::move(tasks));
}

void SelectBatcher::RunTasks(Engine* engine, std::vector<SelectTask> tasks) {
  // What the engine works on until the launch's answers are all in; owned
  // by the completion callback.
  struct Run {
    std::vector<SelectTask> tasks;
    std::vector<absl::Status> statuses;
    std::vector<SelectCall> calls;
    std::vector<size_t> admitted;  // the task of each call
  };
  auto run = std::make_unique<Run>();
  run->tasks = std::move(tasks);
  run->statuses.resize(run->tasks.size());
  const absl::Time started = absl::Now();
  for (size_t i = 0; i < run->tasks.size(); ++i) {
    SelectTask& task = run->tasks[i];
    if (task.admit) run->statuses[i] = task.admit();
    if (!run->statuses[i].ok()) continue;
    if (task.times != nullptr) task.times->started = started;
    run->calls.push_back({task.request, task.selection, absl::OkStatus(), task.times, task.device});
    run->admitted.push_back(i);
  }
  const absl::Span<SelectCall> calls = absl::MakeSpan(run->calls);
  engine->SelectMany(calls, [run = std::move(run)] {
    for (size_t j = 0; j < run->calls.size(); ++j) {
      run->statuses[run->admitted[j]] = run->calls[j].status;
    }
    for (size_t i = 0; i < run->tasks.size(); ++i) run->tasks[i].done(run->statuses[i]);
  });
}

SelectBatcher::Stats SelectBatcher::stats() const {
  absl::MutexLock lock(&mutex_);
  return stats_;
}

}  // namespace blocksel
