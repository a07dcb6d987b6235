#include "server/transport/completion_queue_poller.h"

#include <utility>

namespace blocksel {

CompletionQueuePoller::CompletionQueuePoller(
    std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues)
    : queues_(std::move(queues)) {}

CompletionQueuePoller::~CompletionQueuePoller() { Stop(); }

void CompletionQueuePoller::Start() {
  for (const auto& queue : queues_) {
    threads_.emplace_back([queue = queue.get()] {
      void* tag = nullptr;
      bool ok = false;
      while (queue->Next(&tag, &ok)) static_cast<CompletionHandler*>(tag)->Proceed(ok);
    });
  }
}

void CompletionQueuePoller::Stop() {
  if (stopped_) return;
  stopped_ = true;
  for (const auto& queue : queues_) queue->Shutdown();
  for (std::thread& thread : threads_) thread.join();
  // Events of queues no thread served (Start never ran).
  if (threads_.empty()) {
    for (const auto& queue : queues_) {
      void* tag = nullptr;
      bool ok = false;
      while (queue->Next(&tag, &ok)) static_cast<CompletionHandler*>(tag)->Proceed(ok);
    }
  }
}

}  // namespace blocksel
