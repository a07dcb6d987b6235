// Threads of the server's own that each serve one completion queue of
// gRPC's async API, for the methods served that way (StreamSelect): the
// thread that polls the transport also runs the reaction, so a message
// costs no hand-off to another thread.
#ifndef BLOCKSEL_SERVER_TRANSPORT_COMPLETION_QUEUE_POLLER_H_
#define BLOCKSEL_SERVER_TRANSPORT_COMPLETION_QUEUE_POLLER_H_

#include <memory>
#include <thread>
#include <vector>

#include "grpcpp/completion_queue.h"

namespace blocksel {

// What a completion-queue tag points to: the poller calls Proceed with the
// event's ok on the queue's thread.
class CompletionHandler {
 public:
  virtual void Proceed(bool ok) = 0;

 protected:
  ~CompletionHandler() = default;
};

// One thread per queue, from Start until the queue is shut down and
// drained. Every tag put on the queues must be a CompletionHandler*.
class CompletionQueuePoller {
 public:
  explicit CompletionQueuePoller(std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues);
  // Shuts the queues down (the server must have been shut down first) and
  // joins the threads.
  ~CompletionQueuePoller();
  CompletionQueuePoller(const CompletionQueuePoller&) = delete;
  CompletionQueuePoller& operator=(const CompletionQueuePoller&) = delete;

  const std::vector<std::unique_ptr<grpc::ServerCompletionQueue>>& queues() const {
    return queues_;
  }
  void Start();
  // Shuts the queues down and waits until every remaining event is
  // handled. Call once the server is shut down. Idempotent.
  void Stop();

 private:
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues_;
  std::vector<std::thread> threads_;
  bool stopped_ = false;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_COMPLETION_QUEUE_POLLER_H_
