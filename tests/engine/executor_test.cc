#include "server/engine/executor.h"

#include <atomic>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

// Generous: these waits only fail when something is broken, so a slow CI
// machine never trips them.
constexpr absl::Duration kWaitLimit = absl::Seconds(10);

Executor::Options SmallQueue(int64_t capacity) {
  Executor::Options options;
  options.queue_capacity = capacity;
  return options;
}

// Occupies the worker until released, so tests can fill the queue behind
// it without racing the worker.
class WorkerBlocker {
 public:
  // Submits the blocking task and waits until the worker is inside it.
  absl::Status Block(Executor& executor) {
    absl::Status queued = executor.Submit([this] {
      running_.Notify();
      release_.WaitForNotification();
    });
    if (!queued.ok()) return queued;
    if (!running_.WaitForNotificationWithTimeout(kWaitLimit)) {
      return absl::DeadlineExceededError("the worker never started the task");
    }
    return absl::OkStatus();
  }
  void Release() { release_.Notify(); }

 private:
  absl::Notification running_;
  absl::Notification release_;
};

TEST(ExecutorTest, RunsTasksInSubmissionOrderOnOneThread) {
  Executor executor(SmallQueue(128));
  absl::Mutex mutex;
  std::vector<int> order;
  std::vector<std::thread::id> threads;
  absl::Notification done;
  constexpr int kTasks = 100;
  for (int i = 0; i < kTasks; ++i) {
    ASSERT_TRUE(executor
                    .Submit([&, i] {
                      absl::MutexLock lock(&mutex);
                      order.push_back(i);
                      threads.push_back(std::this_thread::get_id());
                      if (i == kTasks - 1) done.Notify();
                    })
                    .ok());
  }
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kWaitLimit));
  absl::MutexLock lock(&mutex);
  ASSERT_EQ(order.size(), static_cast<size_t>(kTasks));
  for (int i = 0; i < kTasks; ++i) EXPECT_EQ(order[i], i);
  for (const std::thread::id& id : threads) {
    EXPECT_EQ(id, threads.front());
    EXPECT_NE(id, std::this_thread::get_id());
  }
}

TEST(ExecutorTest, FullQueueIsResourceExhaustedAndDropsTheTask) {
  constexpr int64_t kCapacity = 3;
  Executor executor(SmallQueue(kCapacity));
  WorkerBlocker blocker;
  ASSERT_TRUE(blocker.Block(executor).ok());

  std::atomic<int> ran{0};
  for (int64_t i = 0; i < kCapacity; ++i) {
    ASSERT_TRUE(executor.Submit([&ran] { ++ran; }).ok()) << "task " << i;
  }
  EXPECT_EQ(executor.queue_depth(), kCapacity);

  bool refused_task_ran = false;
  absl::Status refused = executor.Submit([&refused_task_ran] { refused_task_ran = true; });
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(executor.queue_depth(), kCapacity);

  blocker.Release();
  executor.Stop();
  EXPECT_EQ(ran.load(), kCapacity);
  EXPECT_FALSE(refused_task_ran);
  EXPECT_EQ(executor.queue_depth(), 0);
}

TEST(ExecutorTest, QueueAcceptsAgainOnceTheWorkerCatchesUp) {
  Executor executor(SmallQueue(1));
  WorkerBlocker blocker;
  ASSERT_TRUE(blocker.Block(executor).ok());
  absl::Notification first_ran;
  ASSERT_TRUE(executor.Submit([&first_ran] { first_ran.Notify(); }).ok());
  EXPECT_EQ(executor.Submit([] {}).code(), absl::StatusCode::kResourceExhausted);

  blocker.Release();
  ASSERT_TRUE(first_ran.WaitForNotificationWithTimeout(kWaitLimit));
  absl::Notification second_ran;
  EXPECT_TRUE(executor.Submit([&second_ran] { second_ran.Notify(); }).ok());
  EXPECT_TRUE(second_ran.WaitForNotificationWithTimeout(kWaitLimit));
}

TEST(ExecutorTest, SubmitAfterStopIsUnavailableAndDropsTheTask) {
  Executor executor(SmallQueue(8));
  executor.Stop();
  bool ran = false;
  EXPECT_EQ(executor.Submit([&ran] { ran = true; }).code(), absl::StatusCode::kUnavailable);
  executor.Stop();  // a second Stop is harmless
  EXPECT_FALSE(ran);
  EXPECT_EQ(executor.queue_depth(), 0);
}

TEST(ExecutorTest, StopRunsTheTasksAlreadyQueued) {
  Executor executor(SmallQueue(16));
  WorkerBlocker blocker;
  ASSERT_TRUE(blocker.Block(executor).ok());
  std::vector<int> order;  // written by the worker only; read after the join
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(executor.Submit([&order, i] { order.push_back(i); }).ok());
  }

  // Stop blocks until the worker drains, so release the worker from another
  // thread once Stop has refused new work.
  std::thread stopper([&executor] { executor.Stop(); });
  // Submit starts failing as soon as Stop has marked the executor stopping.
  // Until then a late task may still get in (and will run, after the five)
  // or find the queue full.
  const absl::Time deadline = absl::Now() + kWaitLimit;
  absl::Status late = absl::OkStatus();
  while (late.code() != absl::StatusCode::kUnavailable && absl::Now() < deadline) {
    late = executor.Submit([&order] { order.push_back(-1); });
    std::this_thread::yield();
  }
  EXPECT_EQ(late.code(), absl::StatusCode::kUnavailable);
  blocker.Release();
  stopper.join();

  ASSERT_GE(order.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(order[i], i);
  EXPECT_EQ(executor.queue_depth(), 0);
}

TEST(ExecutorTest, DestructorRunsTheTasksAlreadyQueued) {
  std::atomic<int> ran{0};
  {
    Executor executor(SmallQueue(16));
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(executor.Submit([&ran] { ++ran; }).ok());
  }
  EXPECT_EQ(ran.load(), 10);
}

TEST(ExecutorTest, PeriodicTaskRunsWithoutOtherWork) {
  std::atomic<int> runs{0};
  absl::Notification ran_twice;
  Executor::Options options;
  options.periodic_interval = absl::Milliseconds(5);
  options.periodic = [&runs, &ran_twice] {
    if (++runs == 2) ran_twice.Notify();
  };
  Executor executor(std::move(options));
  EXPECT_TRUE(ran_twice.WaitForNotificationWithTimeout(kWaitLimit));
  executor.Stop();
  EXPECT_GE(runs.load(), 2);
}

TEST(ExecutorTest, PeriodicTaskRunsOnTheWorkerThread) {
  // Learn the worker's thread id from a task, then compare.
  std::thread::id worker_id;
  std::thread::id periodic_id;
  absl::Notification periodic_ran;
  Executor::Options options;
  options.periodic_interval = absl::Milliseconds(5);
  options.periodic = [&periodic_id, &periodic_ran] {
    if (periodic_ran.HasBeenNotified()) return;
    periodic_id = std::this_thread::get_id();
    periodic_ran.Notify();
  };
  Executor executor(std::move(options));
  absl::Notification task_ran;
  ASSERT_TRUE(executor
                  .Submit([&worker_id, &task_ran] {
                    worker_id = std::this_thread::get_id();
                    task_ran.Notify();
                  })
                  .ok());
  ASSERT_TRUE(task_ran.WaitForNotificationWithTimeout(kWaitLimit));
  ASSERT_TRUE(periodic_ran.WaitForNotificationWithTimeout(kWaitLimit));
  EXPECT_EQ(periodic_id, worker_id);
}

TEST(ExecutorTest, NoPeriodicTaskIsFine) {
  Executor executor(SmallQueue(4));  // periodic left empty
  absl::Notification ran;
  ASSERT_TRUE(executor.Submit([&ran] { ran.Notify(); }).ok());
  EXPECT_TRUE(ran.WaitForNotificationWithTimeout(kWaitLimit));
}

// Background work a task leaves pending is polled for on the worker, also
// while no task comes, until the poll reports none left; tasks still run in
// between.
TEST(ExecutorTest, PendingWorkIsPolledUntilDoneWithTasksInBetween) {
  constexpr int kPendingPolls = 50;
  std::atomic<int> left{0};
  std::atomic<int> polls_while_pending{0};
  Executor::Options options;
  options.poll = [&] {
    if (left.load() == 0) return false;
    polls_while_pending.fetch_add(1);
    return left.fetch_sub(1) > 1;
  };
  Executor executor(std::move(options));
  absl::Notification started;
  ASSERT_TRUE(executor
                  .Submit([&] {
                    left.store(kPendingPolls);
                    started.Notify();
                  })
                  .ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kWaitLimit));
  absl::Notification between;
  ASSERT_TRUE(executor.Submit([&] { between.Notify(); }).ok());
  ASSERT_TRUE(between.WaitForNotificationWithTimeout(kWaitLimit));
  const absl::Time give_up = absl::Now() + kWaitLimit;
  while (left.load() > 0 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(left.load(), 0);
  EXPECT_EQ(polls_while_pending.load(), kPendingPolls);
}

// Stop waits for what the queued tasks left pending.
TEST(ExecutorTest, StopFinishesPendingWork) {
  std::atomic<int> left{0};
  Executor::Options options;
  options.poll = [&] { return left.load() > 0 && left.fetch_sub(1) > 1; };
  auto executor = std::make_unique<Executor>(std::move(options));
  ASSERT_TRUE(executor->Submit([&] { left.store(1000); }).ok());
  executor->Stop();
  EXPECT_EQ(left.load(), 0);
}

}  // namespace
}  // namespace blocksel
