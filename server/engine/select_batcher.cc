#include "server/engine/select_batcher.h"

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
  std::vector<SelectTask> tasks;
  {
    absl::MutexLock lock(&mutex_);
    mutex_.AwaitWithDeadline(absl::Condition(&group->full), group->opened + options_.window);
    auto open = open_groups_.find(layer);
    if (open != open_groups_.end() && open->second == group) open_groups_.erase(open);
    tasks = std::move(group->tasks);
    ++stats_.groups;
  }
  RunTasks(engine_, std::move(tasks));
}

void SelectBatcher::RunTasks(Engine* engine, std::vector<SelectTask> tasks) {
  std::vector<absl::Status> statuses(tasks.size());
  std::vector<SelectCall> calls;
  std::vector<size_t> admitted;
  const absl::Time started = absl::Now();
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (tasks[i].admit) statuses[i] = tasks[i].admit();
    if (!statuses[i].ok()) continue;
    if (tasks[i].times != nullptr) tasks[i].times->started = started;
    calls.push_back({tasks[i].request, tasks[i].selection, absl::OkStatus(), tasks[i].times});
    admitted.push_back(i);
  }
  engine->SelectMany(absl::MakeSpan(calls));
  for (size_t j = 0; j < calls.size(); ++j) statuses[admitted[j]] = calls[j].status;
  for (size_t i = 0; i < tasks.size(); ++i) tasks[i].done(statuses[i]);
}

SelectBatcher::Stats SelectBatcher::stats() const {
  absl::MutexLock lock(&mutex_);
  return stats_;
}

}  // namespace blocksel
