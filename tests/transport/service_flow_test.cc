// How the service schedules work, over loopback: cross-stream batching,
// calls whose caller gave up while they were queued, and a stream whose
// reader stops reading.
#include <atomic>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/transport/service_test_fixture.h"

namespace blocksel {
namespace {

using testing::GrpcServiceTest;
using testing::kFirstSparseLayer;
using testing::kWaitLimit;
using Encoded = testing::EncodedBf16;

// Long enough that every call a test sends lands inside one window.
constexpr absl::Duration kBatchWindow = absl::Milliseconds(100);

std::vector<int32_t> IdsOf(const v1::SelectResponse& response) {
  absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(response.selection());
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

class BatchingTest : public GrpcServiceTest {
 protected:
  void Configure(ServerConfig* config) override { config->batch_window = kBatchWindow; }

  // Waits until the batcher has taken `count` requests into groups.
  bool AwaitBatched(int64_t count) {
    const absl::Time give_up = absl::Now() + kWaitLimit;
    while (server_->batching_stats().batched_requests < count) {
      if (absl::Now() > give_up) return false;
      absl::SleepFor(absl::Milliseconds(1));
    }
    return true;
  }

  // A decode Select, on its own thread, that opens a batching group: the
  // engine then waits out the window before it runs anything queued after
  // it. Returns once the group is open; Finish() joins and checks it.
  class EngineHold {
   public:
    EngineHold(BatchingTest* test, uint64_t sequence, int64_t seq_len)
        : batch_(test->Decode(1, kFirstSparseLayer, {{sequence, seq_len}})) {
      thread_ = test->SelectInBackground(batch_.request, &response_, &status_);
      EXPECT_TRUE(test->AwaitBatched(1));
    }
    ~EngineHold() {
      if (thread_.joinable()) thread_.join();
    }
    // Waits for the held Select and checks its answer.
    void Finish() {
      thread_.join();
      ASSERT_TRUE(status_.ok()) << status_.error_message();
      EXPECT_EQ(IdsOf(response_), batch_.expected);
    }

   private:
    Batch batch_;
    v1::SelectResponse response_;
    grpc::Status status_;
    std::thread thread_;
  };

  // A sequence holding `tokens` keys of the first sparse layer.
  uint64_t FilledSequence(int64_t tokens) {
    const uint64_t id = Open();
    EXPECT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, tokens).ok());
    return id;
  }

  // A stub on its own channel, connected already, so a call made with it
  // reaches the server at once.
  std::unique_ptr<v1::BlockSelector::Stub> ConnectedStub() {
    std::shared_ptr<grpc::Channel> channel =
        grpc::CreateChannel(target_, grpc::InsecureChannelCredentials());
    EXPECT_TRUE(channel->WaitForConnected(absl::ToChronoTime(absl::Now() + kWaitLimit)));
    return v1::BlockSelector::NewStub(channel);
  }

  // Starts a unary Select of request on its own thread and channel; the
  // result lands in *response and *status.
  std::thread SelectInBackground(const v1::SelectRequest& request, v1::SelectResponse* response,
                                 grpc::Status* status) {
    return std::thread([&request, response, status, stub = ConnectedStub()] {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + kWaitLimit));
      *status = stub->Select(&context, request, response);
    });
  }
};

TEST_F(BatchingTest, DecodeCallsFromSeveralClientsShareOneLaunch) {
  constexpr int kCallers = 4;
  std::vector<Batch> batches;
  for (int i = 0; i < kCallers; ++i) {
    const uint64_t id = Open();
    ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 300 + 150 * i).ok());
    batches.push_back(Decode(10 + i, kFirstSparseLayer, {{id, 300 + 150 * i}}));
  }
  // A stream and unary calls, from different channels.
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();
  const int64_t launches = server_->select_launches();

  ASSERT_TRUE((*session)->Send(batches[0].request).ok());
  std::vector<v1::SelectResponse> responses(kCallers);
  std::vector<grpc::Status> statuses(kCallers);
  std::vector<std::thread> callers;
  for (int i = 1; i < kCallers; ++i) {
    callers.push_back(SelectInBackground(batches[i].request, &responses[i], &statuses[i]));
  }
  absl::StatusOr<SelectResult> streamed = (*session)->Receive();
  for (std::thread& caller : callers) caller.join();

  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_EQ(streamed->block_ids, batches[0].expected);
  for (int i = 1; i < kCallers; ++i) {
    ASSERT_TRUE(statuses[i].ok()) << statuses[i].error_message();
    EXPECT_EQ(responses[i].request_id(), batches[i].request.request_id());
    EXPECT_EQ(IdsOf(responses[i]), batches[i].expected) << "caller " << i;
  }
  // All four arrived within one window, so they ran together.
  EXPECT_EQ(server_->select_launches() - launches, 1);
  EXPECT_EQ(server_->batching_stats().batched_requests, kCallers);
  EXPECT_TRUE((*session)->Close().ok());
}

TEST_F(BatchingTest, AStreamKeepsItsOrderAcrossBatchedAndUnbatchedRequests) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 400).ok());
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();

  // Decode (batched), then a prefill carrying keys 400..527 (run alone),
  // then decodes that need those keys: they must not overtake the prefill
  // by joining the first decode's group.
  Batch first = Decode(1, kFirstSparseLayer, {{id, 400}});
  Encoded chunk;
  v1::KeyAppend append = MakeAppend(id, kFirstSparseLayer, 400, 128, &chunk);
  Remember(id, kFirstSparseLayer, 400, chunk.values);
  v1::SelectRequest prefill;
  prefill.set_request_id(2);
  prefill.set_layer(kFirstSparseLayer);
  v1::PrefillRequest* rows = prefill.mutable_prefill()->add_requests();
  rows->set_sequence_id(id);
  rows->set_prefix_len(400);
  rows->set_q_len(128);
  rows->set_keys(append.keys());
  Encoded prefill_queries = RandomQueries(128);
  prefill.set_queries(prefill_queries.bytes);
  const std::vector<int32_t> prefill_expected = ReferenceSelect(
      model_.shape(), {{KeysOf(id, kFirstSparseLayer), 400, 128}}, prefill_queries.values.data());
  Batch third = Decode(3, kFirstSparseLayer, {{id, 528}});
  Batch fourth = Decode(4, kFirstSparseLayer, {{id, 500}});

  for (const v1::SelectRequest* request :
       {&first.request, &prefill, &third.request, &fourth.request}) {
    ASSERT_TRUE((*session)->Send(*request).ok());
  }
  const std::vector<std::pair<uint64_t, const std::vector<int32_t>*>> expected = {
      {1, &first.expected}, {2, &prefill_expected}, {3, &third.expected}, {4, &fourth.expected}};
  for (const auto& [request_id, ids] : expected) {
    absl::StatusOr<SelectResult> result = (*session)->Receive();
    ASSERT_TRUE(result.ok()) << "request " << request_id << ": " << result.status();
    EXPECT_EQ(result->request_id, request_id);
    EXPECT_EQ(result->block_ids, *ids) << "request " << request_id;
  }
  EXPECT_TRUE((*session)->Close().ok());
}

// A unary call that waits behind an open batching group (whose window holds
// the engine) and whose caller gives up is skipped when its turn comes: its
// effect (here, opening a sequence id) never happens.
TEST_F(BatchingTest, QueuedCallPastItsDeadlineIsNotRun) {
  EngineHold hold(this, FilledSequence(300), 300);

  std::unique_ptr<v1::BlockSelector::Stub> stub = ConnectedStub();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kBatchWindow / 4));
  v1::OpenSequenceRequest open;
  open.set_sequence_id(777);
  v1::OpenSequenceResponse opened;
  EXPECT_EQ(stub->OpenSequence(&context, open, &opened).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  hold.Finish();

  // 777 is free: the expired call did not open it.
  absl::StatusOr<uint64_t> reopened = client_->OpenSequence(777);
  EXPECT_TRUE(reopened.ok()) << reopened.status();
}

TEST_F(BatchingTest, QueuedCallCancelledByItsCallerIsNotRun) {
  EngineHold hold(this, FilledSequence(300), 300);

  std::unique_ptr<v1::BlockSelector::Stub> stub = ConnectedStub();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kWaitLimit));
  std::thread canceller([&context] {
    absl::SleepFor(kBatchWindow / 4);
    context.TryCancel();
  });
  v1::OpenSequenceRequest open;
  open.set_sequence_id(778);
  v1::OpenSequenceResponse opened;
  EXPECT_EQ(stub->OpenSequence(&context, open, &opened).error_code(), grpc::StatusCode::CANCELLED);
  canceller.join();
  hold.Finish();

  absl::StatusOr<uint64_t> reopened = client_->OpenSequence(778);
  EXPECT_TRUE(reopened.ok()) << reopened.status();
}

// The same for a Select that joined a group: it is dropped from the launch,
// so the keys it carries are never appended.
TEST_F(BatchingTest, BatchedSelectPastItsDeadlineIsDroppedFromTheLaunch) {
  const uint64_t id = FilledSequence(300);
  EngineHold hold(this, FilledSequence(200), 200);

  // Decode at 301, carrying token 300's key.
  Encoded key;
  v1::KeyAppend append = MakeAppend(id, kFirstSparseLayer, 300, 1, &key);
  v1::SelectRequest late = Decode(2, kFirstSparseLayer, {{id, 300}}).request;
  late.mutable_decode()->mutable_requests(0)->set_seq_len(301);
  late.mutable_decode()->mutable_requests(0)->set_keys(append.keys());
  std::unique_ptr<v1::BlockSelector::Stub> stub = ConnectedStub();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kBatchWindow / 4));
  v1::SelectResponse response;
  EXPECT_EQ(stub->Select(&context, late, &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  hold.Finish();

  // Token 300 was never appended.
  v1::SelectRequest needs_it = late;
  needs_it.mutable_decode()->mutable_requests(0)->clear_keys();
  EXPECT_EQ(client_->Select(needs_it).status().code(), absl::StatusCode::kFailedPrecondition);
}

class SlowReaderTest : public GrpcServiceTest {
 protected:
  static constexpr int kMaxInflight = 2;
  void Configure(ServerConfig* config) override {
    config->max_inflight_per_stream = kMaxInflight;
    config->max_message_bytes = 4 << 20;
    config->grpc_memory_bytes = 16 << 20;
  }
};

// A client that sends and never reads: the server answers a few requests,
// then stops reading the stream, so what it holds for that stream stays
// bounded however much the client tries to send.
TEST_F(SlowReaderTest, AStreamThatIsNotReadStopsBeingServed) {
  constexpr int64_t kRows = 2048;
  constexpr int kRequests = 200;
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, kRows).ok());
  // Each answer carries ids and block scores: 2 heads x 2048 rows x
  // (4 ids + 16 scores) x 4 bytes = 320 KiB; all of them would be 64 MiB.
  v1::SelectRequest request = FirstTokensPrefill(id, kRows);
  request.set_return_block_scores(true);

  const int64_t launches = server_->select_launches();
  std::unique_ptr<v1::BlockSelector::Stub> stub = RawStub();
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SelectRequest, v1::SelectResponse>> stream =
      stub->StreamSelect(&context);
  std::atomic<int> sent{0};
  std::thread sender([&] {
    for (int i = 0; i < kRequests; ++i) {
      request.set_request_id(i);
      if (!stream->Write(request)) return;  // cancelled below
      sent.fetch_add(1);
    }
  });
  // Wait until the server has stopped making progress.
  int64_t served = -1;
  for (int still = 0; still < 5;) {
    absl::SleepFor(absl::Milliseconds(200));
    const int64_t now = server_->select_launches() - launches;
    still = now == served ? still + 1 : 0;
    served = now;
  }
  context.TryCancel();
  sender.join();

  std::cout << "slow reader: " << sent.load() << " requests sent, " << served << " served\n";
  // The server holds max_inflight answers; the rest of those served sit in
  // the client's receive window, which gRPC sizes by itself (a few MiB).
  EXPECT_LE(served, 32);
  EXPECT_LT(sent.load(), kRequests);
}

class DeepStreamTest : public GrpcServiceTest {
 protected:
  static constexpr int kMaxInflight = 32;
  void Configure(ServerConfig* config) override { config->max_inflight_per_stream = kMaxInflight; }
};

// A stream that queued many slow requests and is then cancelled: what it
// had queued is skipped, so the engine is free for others at once.
TEST_F(DeepStreamTest, RequestsQueuedByACancelledStreamAreSkipped) {
  constexpr int64_t kRows = 2048;
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, kRows).ok());
  v1::SelectRequest request = FirstTokensPrefill(id, kRows);

  const int64_t launches = server_->select_launches();
  std::unique_ptr<v1::BlockSelector::Stub> stub = RawStub();
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SelectRequest, v1::SelectResponse>> stream =
      stub->StreamSelect(&context);
  for (int i = 0; i < kMaxInflight; ++i) {
    request.set_request_id(i);
    ASSERT_TRUE(stream->Write(request));
  }
  v1::SelectResponse first;
  ASSERT_TRUE(stream->Read(&first));
  EXPECT_FALSE(first.has_error()) << first.error().message();
  context.TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);

  // The engine runs calls in arrival order, so another caller's call queued
  // now runs after every request the stream had queued: run or skipped.
  absl::StatusOr<uint64_t> other = client_->OpenSequence();
  ASSERT_TRUE(other.ok()) << other.status();
  const int64_t ran = server_->select_launches() - launches;
  std::cout << "cancelled stream: " << ran << " of " << kMaxInflight << " queued requests ran\n";
  EXPECT_LT(ran, kMaxInflight / 2);
}

// An append stream cancelled while its message waits behind a busy engine:
// the message is skipped, so the cache is as if it had never been sent.
TEST_F(DeepStreamTest, AnAppendQueuedByACancelledStreamIsSkipped) {
  constexpr int64_t kRows = 2048;
  constexpr int64_t kAppendTokens = 128;
  const uint64_t busy = Open();
  const uint64_t other = Open();
  ASSERT_TRUE(AppendRandom(busy, kFirstSparseLayer, 0, kRows).ok());
  const int64_t free_pages = FreePages();

  // Slow prefills keep the engine busy while the append waits behind them.
  std::unique_ptr<v1::BlockSelector::Stub> stub = RawStub();
  grpc::ClientContext select_context;
  auto selects = stub->StreamSelect(&select_context);
  v1::SelectRequest prefill = FirstTokensPrefill(busy, kRows);
  for (int i = 0; i < kMaxInflight; ++i) {
    prefill.set_request_id(i);
    ASSERT_TRUE(selects->Write(prefill));
  }
  v1::SelectResponse first;
  ASSERT_TRUE(selects->Read(&first));

  grpc::ClientContext append_context;
  v1::AppendKeysResponse appended;
  auto appends = stub->StreamAppendKeys(&append_context, &appended);
  Encoded keys;
  v1::AppendKeysRequest append;
  *append.add_appends() = MakeAppend(other, kFirstSparseLayer, 0, kAppendTokens, &keys);
  ASSERT_TRUE(appends->Write(append));
  append_context.TryCancel();
  EXPECT_EQ(appends->Finish().error_code(), grpc::StatusCode::CANCELLED);

  // Every prefill answered: the append's turn has come and gone.
  selects->WritesDone();
  v1::SelectResponse response;
  while (selects->Read(&response)) {
  }
  EXPECT_TRUE(selects->Finish().ok());
  EXPECT_EQ(FreePages(), free_pages);
  v1::SelectRequest decode;
  decode.set_layer(kFirstSparseLayer);
  v1::DecodeRequest* row = decode.mutable_decode()->add_requests();
  row->set_sequence_id(other);
  row->set_seq_len(kAppendTokens);
  decode.set_queries(RandomQueries(1).bytes);
  EXPECT_EQ(client_->Select(decode).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace blocksel
