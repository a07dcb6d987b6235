// A fixed set of worker threads for data-parallel loops.
#ifndef BLOCKSEL_KERNELS_CPU_THREAD_POOL_H_
#define BLOCKSEL_KERNELS_CPU_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace blocksel::cpu {

// Runs ParallelFor loops on num_threads threads: the caller's thread plus
// num_threads - 1 workers that sleep between loops.
//
// Thread-safety: ParallelFor may be called by one thread at a time.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls body(thread_index, i) once for each i in [0, count), spread over
  // the threads; thread_index is in [0, num_threads()) and unique among the
  // calls running at one time. Returns when every call has returned.
  void ParallelFor(int64_t count, const std::function<void(int thread_index, int64_t i)>& body);

 private:
  void WorkerLoop(int thread_index);
  void RunShare(int thread_index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  // Guarded by mutex_.
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;
  // Written under mutex_ before a generation starts, read-only during it.
  const std::function<void(int, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  // Claimed with relaxed atomic increments during a generation.
  std::atomic<int64_t> next_index_{0};
};

}  // namespace blocksel::cpu

#endif  // BLOCKSEL_KERNELS_CPU_THREAD_POOL_H_
