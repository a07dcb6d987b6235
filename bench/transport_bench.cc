// The transport alone: round trips of one StreamSelect-sized request and
// response through gRPC, with the server's two APIs and the hand-off to an
// engine thread, so the server's transport is chosen by measurement.
//
// The server answers every request with a fixed response (no selection).
// Variants:
//   api      callback: grpc::ServerBidiReactor (gRPC's callback API)
//            cq:       AsyncService with threads of their own, each
//                      blocking in its completion queue's Next
//            cqspin:   the same, each thread polling its queue without
//                      blocking (AsyncNext with a deadline of now)
//   handoff  inline:   the reaction writes the response itself
//            wait:     the request goes to a separate "engine" thread
//                      that sleeps on a condition variable when idle, and
//                      that thread starts the write (today's server shape)
//            spin:     the same, with the engine thread spinning
//                      --spin_us before it sleeps
//   target   tcp (127.0.0.1) and unix (a socket file)
//   client   sync:     a synchronous ClientReaderWriter (SelectSession's
//                      shape): Write, then Read
//            cq:       the async API on a completion queue of the caller's:
//                      the write and the read outstanding together, the
//                      caller blocking in Next
//            cqspin:   the same, the caller polling without blocking
// One request in flight, closed loop.
//
// Example: transport_bench --requests=20000 --request_bytes=8192
//          --response_bytes=2048
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/functional/any_invocable.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "grpc/support/time.h"
#include "grpcpp/completion_queue.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

ABSL_FLAG(std::string, apis, "callback,cq,cqspin", "Server APIs to measure: callback, cq, cqspin");
ABSL_FLAG(std::string, clients, "sync,cq,cqspin", "Clients to measure: sync, cq, cqspin");
ABSL_FLAG(std::string, handoffs, "inline,wait,spin", "Hand-offs to measure: inline, wait, spin");
ABSL_FLAG(std::string, targets, "tcp,unix", "Transports to measure: tcp, unix");
ABSL_FLAG(int, requests, 20000, "Measured round trips per variant (after 10% warm-up)");
ABSL_FLAG(int, request_bytes, 8192, "Query bytes per request (B=8, H=4, D=128 bf16: 8192)");
ABSL_FLAG(int, response_bytes, 2048, "Block-id bytes per response (B=8, H=4, topk 16: 2048)");
ABSL_FLAG(int, cq_threads, 2, "Polling threads of the cq server");
ABSL_FLAG(int, spin_us, 100, "How long the spinning engine thread spins before it sleeps");
ABSL_FLAG(std::string, json_out, "", "Also write the table as JSON to this file");

namespace blocksel {
namespace {

using Request = v1::SelectRequest;
using Response = v1::SelectResponse;

// The "engine" thread: runs posted work in order. Idle, it either sleeps on
// the mutex's condition at once (spin = 0) or polls for `spin` first.
class EngineThread {
 public:
  explicit EngineThread(absl::Duration spin) : spin_(spin), thread_([this] { Loop(); }) {}
  ~EngineThread() {
    {
      absl::MutexLock lock(&mutex_);
      stopping_ = true;
    }
    thread_.join();
  }
  void Post(absl::AnyInvocable<void()> work) {
    absl::MutexLock lock(&mutex_);
    work_.push_back(std::move(work));
    pending_.store(true, std::memory_order_release);
  }

 private:
  void Loop() {
    for (;;) {
      if (spin_ > absl::ZeroDuration()) {
        const absl::Time until = absl::Now() + spin_;
        while (!pending_.load(std::memory_order_acquire) && absl::Now() < until) {
        }
      }
      absl::AnyInvocable<void()> work;
      {
        absl::MutexLock lock(&mutex_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
          return !work_.empty() || stopping_;
        };
        mutex_.Await(absl::Condition(&ready));
        if (work_.empty()) return;
        work = std::move(work_.front());
        work_.pop_front();
        pending_.store(!work_.empty(), std::memory_order_release);
      }
      work();
    }
  }

  const absl::Duration spin_;
  absl::Mutex mutex_;
  std::deque<absl::AnyInvocable<void()>> work_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::atomic<bool> pending_{false};
  std::thread thread_;
};

// Runs `write` inline or on the engine thread.
void Dispatch(EngineThread* engine, absl::AnyInvocable<void()> write) {
  if (engine == nullptr) {
    write();
  } else {
    engine->Post(std::move(write));
  }
}

Response MakeResponse(int bytes) {
  Response response;
  response.mutable_selection()->set_block_ids(std::string(static_cast<size_t>(bytes), '\1'));
  return response;
}

// ------------------------------------------------------------ callback API

class CallbackEcho final : public grpc::ServerBidiReactor<Request, Response> {
 public:
  CallbackEcho(EngineThread* engine, const Response& response)
      : engine_(engine), response_(response) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    response_.set_request_id(request_.request_id());
    Dispatch(engine_, [this] { StartWrite(&response_); });
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::CANCELLED);
      return;
    }
    StartRead(&request_);
  }
  void OnDone() override { delete this; }

 private:
  EngineThread* const engine_;
  Request request_;
  Response response_;
};

class CallbackService final : public v1::BlockSelector::CallbackService {
 public:
  CallbackService(EngineThread* engine, Response response)
      : engine_(engine), response_(std::move(response)) {}
  grpc::ServerBidiReactor<Request, Response>* StreamSelect(
      grpc::CallbackServerContext* /*context*/) override {
    return new CallbackEcho(engine_, response_);
  }

 private:
  EngineThread* const engine_;
  const Response response_;
};

// ------------------------------------------------------------------ cq API

// One stream's state; its address is the tag of its one outstanding op.
class CqEcho {
 public:
  CqEcho(v1::BlockSelector::AsyncService* service, grpc::ServerCompletionQueue* cq,
         EngineThread* engine, const Response& response)
      : service_(service), cq_(cq), engine_(engine), response_(response), stream_(&context_) {
    service_->RequestStreamSelect(&context_, &stream_, cq_, cq_, this);
  }
  void Proceed(bool ok) {
    switch (state_) {
      case State::kConnecting:
        if (!ok) {  // the server is shutting down
          delete this;
          return;
        }
        new CqEcho(service_, cq_, engine_, response_);  // the next stream
        Read();
        return;
      case State::kReading:
        if (!ok) {
          state_ = State::kFinishing;
          stream_.Finish(grpc::Status::OK, this);
          return;
        }
        response_.set_request_id(request_.request_id());
        state_ = State::kWriting;
        Dispatch(engine_, [this] { stream_.Write(response_, this); });
        return;
      case State::kWriting:
        if (!ok) {
          state_ = State::kFinishing;
          stream_.Finish(grpc::Status::CANCELLED, this);
          return;
        }
        Read();
        return;
      case State::kFinishing:
        delete this;
        return;
    }
  }

 private:
  enum class State { kConnecting, kReading, kWriting, kFinishing };
  void Read() {
    state_ = State::kReading;
    stream_.Read(&request_, this);
  }

  v1::BlockSelector::AsyncService* const service_;
  grpc::ServerCompletionQueue* const cq_;
  EngineThread* const engine_;
  State state_ = State::kConnecting;
  grpc::ServerContext context_;
  Request request_;
  Response response_;
  grpc::ServerAsyncReaderWriter<Response, Request> stream_;
};

// ----------------------------------------------------------------- harness

struct Result {
  std::string api, handoff, client, target;
  double p50 = 0, p90 = 0, p99 = 0, mean = 0;
};

double Percentile(std::vector<double> values, double fraction) {
  const size_t index = static_cast<size_t>(fraction * static_cast<double>(values.size() - 1));
  std::nth_element(values.begin(), values.begin() + index, values.end());
  return values[index];
}

// Waits for `tag` on cq, blocking in Next or polling AsyncNext.
bool AwaitTag(grpc::CompletionQueue* cq, bool spin, void* tag) {
  void* got = nullptr;
  bool ok = false;
  if (spin) {
    for (;;) {
      const auto status = cq->AsyncNext(&got, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
      if (status == grpc::CompletionQueue::GOT_EVENT) break;
      if (status == grpc::CompletionQueue::SHUTDOWN) return false;
    }
  } else if (!cq->Next(&got, &ok)) {
    return false;
  }
  return ok && got == tag;
}

// Closed-loop round trips over one stream.
std::vector<double> RunClient(const std::string& target, const std::string& client, int requests,
                              int request_bytes) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
  auto stub = v1::BlockSelector::NewStub(channel);
  grpc::ClientContext context;
  Request request;
  request.set_queries(std::string(static_cast<size_t>(request_bytes), '\2'));
  Response response;
  std::vector<double> latency_us;
  const int warmup = requests / 10;
  if (client == "sync") {
    auto stream = stub->StreamSelect(&context);
    for (int i = 0; i < warmup + requests; ++i) {
      request.set_request_id(static_cast<uint64_t>(i));
      const absl::Time sent = absl::Now();
      if (!stream->Write(request) || !stream->Read(&response)) {
        std::fprintf(stderr, "stream broke after %d round trips\n", i);
        break;
      }
      if (i >= warmup) latency_us.push_back(absl::ToDoubleMicroseconds(absl::Now() - sent));
    }
    stream->WritesDone();
    (void)stream->Finish();
    return latency_us;
  }
  const bool spin = client == "cqspin";
  grpc::CompletionQueue cq;
  int start_tag = 0, write_tag = 0, read_tag = 0, finish_tag = 0;
  auto stream = stub->PrepareAsyncStreamSelect(&context, &cq);
  stream->StartCall(&start_tag);
  if (!AwaitTag(&cq, spin, &start_tag)) return latency_us;
  for (int i = 0; i < warmup + requests; ++i) {
    request.set_request_id(static_cast<uint64_t>(i));
    const absl::Time sent = absl::Now();
    stream->Write(request, &write_tag);
    stream->Read(&response, &read_tag);
    // Both complete, in either order.
    bool ok = true;
    for (int pending = 2; pending > 0 && ok; --pending) {
      void* got = nullptr;
      bool op_ok = false;
      if (spin) {
        while (cq.AsyncNext(&got, &op_ok, gpr_time_0(GPR_CLOCK_MONOTONIC)) !=
               grpc::CompletionQueue::GOT_EVENT) {
        }
      } else {
        cq.Next(&got, &op_ok);
      }
      ok = op_ok;
    }
    if (!ok) {
      std::fprintf(stderr, "stream broke after %d round trips\n", i);
      break;
    }
    if (i >= warmup) latency_us.push_back(absl::ToDoubleMicroseconds(absl::Now() - sent));
  }
  grpc::Status status;
  stream->WritesDone(&write_tag);
  AwaitTag(&cq, spin, &write_tag);
  stream->Finish(&status, &finish_tag);
  AwaitTag(&cq, spin, &finish_tag);
  cq.Shutdown();
  void* got = nullptr;
  bool ok = false;
  while (cq.Next(&got, &ok)) {
  }
  return latency_us;
}

Result Measure(const std::string& api, const std::string& handoff, const std::string& client,
               const std::string& target_kind) {
  const Response response = MakeResponse(absl::GetFlag(FLAGS_response_bytes));
  std::unique_ptr<EngineThread> engine;
  if (handoff != "inline") {
    engine = std::make_unique<EngineThread>(handoff == "spin"
                                                ? absl::Microseconds(absl::GetFlag(FLAGS_spin_us))
                                                : absl::ZeroDuration());
  }
  const std::string socket = absl::StrCat("/tmp/transport_bench_", getpid(), ".sock");
  grpc::ServerBuilder builder;
  int port = 0;
  std::string target;
  if (target_kind == "unix") {
    unlink(socket.c_str());
    builder.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
    target = "unix:" + socket;
  } else {
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  }
  CallbackService callback_service(engine.get(), response);
  v1::BlockSelector::AsyncService async_service;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs;
  const bool spin_poll = api == "cqspin";
  if (api == "callback") {
    builder.RegisterService(&callback_service);
  } else {
    builder.RegisterService(&async_service);
    for (int i = 0; i < absl::GetFlag(FLAGS_cq_threads); ++i) {
      cqs.push_back(builder.AddCompletionQueue());
    }
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (target_kind != "unix") target = absl::StrCat("127.0.0.1:", port);
  std::vector<std::thread> pollers;
  for (auto& cq : cqs) {
    new CqEcho(&async_service, cq.get(), engine.get(), response);
    pollers.emplace_back([cq = cq.get(), spin_poll] {
      void* tag = nullptr;
      bool ok = false;
      if (!spin_poll) {
        while (cq->Next(&tag, &ok)) static_cast<CqEcho*>(tag)->Proceed(ok);
        return;
      }
      for (;;) {
        const auto status = cq->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
        if (status == grpc::CompletionQueue::SHUTDOWN) return;
        if (status == grpc::CompletionQueue::GOT_EVENT) static_cast<CqEcho*>(tag)->Proceed(ok);
      }
    });
  }
  std::vector<double> latency =
      RunClient(target, client, absl::GetFlag(FLAGS_requests), absl::GetFlag(FLAGS_request_bytes));
  server->Shutdown();
  for (auto& cq : cqs) cq->Shutdown();
  for (std::thread& poller : pollers) poller.join();
  engine.reset();
  unlink(socket.c_str());
  Result result{api, handoff, client, target_kind};
  if (latency.empty()) return result;
  result.p50 = Percentile(latency, 0.5);
  result.p90 = Percentile(latency, 0.9);
  result.p99 = Percentile(latency, 0.99);
  double sum = 0;
  for (double value : latency) sum += value;
  result.mean = sum / static_cast<double>(latency.size());
  return result;
}

int Run() {
  std::vector<Result> results;
  std::printf("round trip of a %d-byte request and a %d-byte response, one stream, %u cores\n",
              absl::GetFlag(FLAGS_request_bytes), absl::GetFlag(FLAGS_response_bytes),
              std::thread::hardware_concurrency());
  std::printf(
      "| server api | hand-off | client | transport | p50 us | p90 us | p99 us | mean us |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (absl::string_view api : absl::StrSplit(absl::GetFlag(FLAGS_apis), ',')) {
    for (absl::string_view handoff : absl::StrSplit(absl::GetFlag(FLAGS_handoffs), ',')) {
      for (absl::string_view client : absl::StrSplit(absl::GetFlag(FLAGS_clients), ',')) {
        for (absl::string_view target : absl::StrSplit(absl::GetFlag(FLAGS_targets), ',')) {
          const Result r = Measure(std::string(api), std::string(handoff), std::string(client),
                                   std::string(target));
          std::printf("| %s | %s | %s | %s | %.1f | %.1f | %.1f | %.1f |\n", r.api.c_str(),
                      r.handoff.c_str(), r.client.c_str(), r.target.c_str(), r.p50, r.p90, r.p99,
                      r.mean);
          std::fflush(stdout);
          results.push_back(r);
        }
      }
    }
  }
  const std::string json_path = absl::GetFlag(FLAGS_json_out);
  if (!json_path.empty()) {
    std::FILE* json = std::fopen(json_path.c_str(), "w");
    if (json == nullptr) return 1;
    std::fprintf(json, "{\"request_bytes\": %d, \"response_bytes\": %d, \"cores\": %u, \"runs\": [",
                 absl::GetFlag(FLAGS_request_bytes), absl::GetFlag(FLAGS_response_bytes),
                 std::thread::hardware_concurrency());
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(json,
                   "%s{\"api\": \"%s\", \"handoff\": \"%s\", \"client\": \"%s\", "
                   "\"transport\": \"%s\", \"p50_us\": %.1f, \"p90_us\": %.1f, "
                   "\"p99_us\": %.1f, \"mean_us\": %.1f}",
                   i == 0 ? "" : ", ", r.api.c_str(), r.handoff.c_str(), r.client.c_str(),
                   r.target.c_str(), r.p50, r.p90, r.p99, r.mean);
    }
    std::fprintf(json, "]}\n");
    std::fclose(json);
  }
  return 0;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run();
}
