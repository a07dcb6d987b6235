// Conformance cases in the style of gRPC's interop tests: each call shape
// with its expected status, and after each, the server's per-stream state
// (the open-streams gauge) back to zero.
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "grpcpp/support/stub_options.h"
#include "gtest/gtest.h"
#include "tests/transport/service_test_fixture.h"

namespace blocksel {
namespace {

using testing::GrpcServiceTest;
using testing::kFirstSparseLayer;
using testing::kMaxMessageBytes;
using testing::kWaitLimit;
using SelectStream = grpc::ClientReaderWriter<v1::SelectRequest, v1::SelectResponse>;

std::vector<int32_t> IdsOf(const v1::SelectResponse& response) {
  absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(response.selection());
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

class ConformanceTest : public GrpcServiceTest {
 protected:
  void Configure(ServerConfig* config) override { config->max_sequences = 1024; }

  // The open-streams gauge, as a scrape would read it.
  double OpenStreams() const {
    for (absl::string_view line : absl::StrSplit(server_->metrics().Text(), '\n')) {
      double value = 0;
      if (absl::ConsumePrefix(&line, "blocksel_open_streams ") && absl::SimpleAtod(line, &value)) {
        return value;
      }
    }
    return -1;
  }

  // Stream state is released when gRPC calls OnDone, shortly after the
  // client sees the status. A stream cancelled right after it began may
  // reach the server after the client's Finish returned: a unary call on
  // the same channel first lets every frame sent before it arrive, and the
  // gauge must then read 0 for kQuietSamples samples in a row, so a reactor
  // created late cannot slip past the check.
  void ExpectNoOpenStreams(v1::BlockSelector::Stub* stub) {
    constexpr int kQuietSamples = 20;
    constexpr absl::Duration kSampleGap = absl::Milliseconds(5);
    v1::GetInfoResponse info;
    EXPECT_TRUE(stub->GetInfo(Context().get(), v1::GetInfoRequest(), &info).ok());
    const absl::Time give_up = absl::Now() + kWaitLimit;
    int quiet = 0;
    while (quiet < kQuietSamples && absl::Now() < give_up) {
      quiet = OpenStreams() == 0 ? quiet + 1 : 0;
      absl::SleepFor(kSampleGap);
    }
    EXPECT_EQ(quiet, kQuietSamples) << "open streams: " << OpenStreams();
  }

  std::unique_ptr<grpc::ClientContext> Context(absl::Duration timeout = kWaitLimit) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return context;
  }
};

TEST_F(ConformanceTest, EmptyStreamEndsOk) {
  auto stub = RawStub();
  auto context = Context();
  std::unique_ptr<SelectStream> stream = stub->StreamSelect(context.get());
  ASSERT_TRUE(stream->WritesDone());
  v1::SelectResponse response;
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
  ExpectNoOpenStreams(stub.get());
}

TEST_F(ConformanceTest, CancelAfterBeginIsCancelled) {
  auto stub = RawStub();
  auto context = Context();
  std::unique_ptr<SelectStream> stream = stub->StreamSelect(context.get());
  context->TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectNoOpenStreams(stub.get());
}

TEST_F(ConformanceTest, CancelAfterFirstResponseIsCancelled) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 500).ok());
  auto stub = RawStub();
  auto context = Context();
  std::unique_ptr<SelectStream> stream = stub->StreamSelect(context.get());
  Batch batch = Decode(1, kFirstSparseLayer, {{id, 500}});
  ASSERT_TRUE(stream->Write(batch.request));
  v1::SelectResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_selection());
  // More requests in flight when the client cancels.
  for (int i = 0; i < 3; ++i) stream->Write(batch.request);
  context->TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectNoOpenStreams(stub.get());
  // The server carries on.
  EXPECT_TRUE(client_->Select(batch.request).ok());
}

TEST_F(ConformanceTest, DeadlineOnASlowBatchIsDeadlineExceeded) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 2048).ok());
  // A prefill of 2048 rows over 2048 keys takes longer than 1 ms here.
  const v1::SelectRequest slow = FirstTokensPrefill(id, 2048);
  auto stub = RawStub();
  auto context = Context(absl::Milliseconds(1));
  v1::SelectResponse response;
  EXPECT_EQ(stub->Select(context.get(), slow, &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server is still fine.
  EXPECT_TRUE(Info().ok());
}

TEST_F(ConformanceTest, MessagesAtAndOverTheSizeLimit) {
  const uint64_t id = Open();
  // The largest AppendKeys that fits the limit: its keys field leaves room
  // for the rest of the message. It reaches the engine, which finds the
  // token count wrong (INVALID_ARGUMENT), not the transport.
  v1::AppendKeysRequest at_limit;
  v1::KeyAppend* append = at_limit.add_appends();
  append->set_sequence_id(id);
  append->set_first_layer(kFirstSparseLayer);
  append->set_num_tokens(1);
  append->set_keys(std::string(kMaxMessageBytes - 64, '\0'));
  ASSERT_LE(at_limit.ByteSizeLong(), static_cast<size_t>(kMaxMessageBytes));
  EXPECT_EQ(client_->AppendKeys(at_limit).status().code(), absl::StatusCode::kInvalidArgument);
  append->set_keys(std::string(kMaxMessageBytes + 1, '\0'));
  EXPECT_EQ(client_->AppendKeys(at_limit).status().code(), absl::StatusCode::kResourceExhausted);
  // Over the limit inside a stream: the stream ends with the same status.
  auto stub = RawStub();
  auto context = Context();
  std::unique_ptr<SelectStream> stream = stub->StreamSelect(context.get());
  v1::SelectRequest huge;
  huge.set_queries(std::string(kMaxMessageBytes + 1, '\0'));
  stream->Write(huge);
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ExpectNoOpenStreams(stub.get());
}

TEST_F(ConformanceTest, UnknownMethodIsUnimplemented) {
  grpc::GenericStub stub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  auto context = Context();
  const std::string no_fields;
  grpc::Slice empty(no_fields);
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(context.get(), "/blocksel.v1.BlockSelector/NoSuchMethod", grpc::StubOptions(),
                 &request, &response, [&](grpc::Status result) {
                   status = std::move(result);
                   done.Notify();
                 });
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kWaitLimit));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(ConformanceTest, HundredsOfConcurrentStreams) {
  constexpr int kStreams = 200;
  constexpr int kRequestsEach = 3;
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 700).ok());
  Batch batch = Decode(1, kFirstSparseLayer, {{id, 700}});
  auto stub = RawStub();
  std::vector<std::thread> clients;
  std::vector<int> answered(kStreams, 0);
  std::vector<grpc::Status> statuses(kStreams);
  for (int s = 0; s < kStreams; ++s) {
    clients.emplace_back([&, s] {
      auto context = Context();
      std::unique_ptr<SelectStream> stream = stub->StreamSelect(context.get());
      for (int i = 0; i < kRequestsEach; ++i) stream->Write(batch.request);
      stream->WritesDone();
      v1::SelectResponse response;
      while (stream->Read(&response)) {
        if (response.has_selection() && IdsOf(response) == batch.expected) ++answered[s];
      }
      statuses[s] = stream->Finish();
    });
  }
  for (std::thread& client : clients) client.join();
  for (int s = 0; s < kStreams; ++s) {
    EXPECT_TRUE(statuses[s].ok()) << "stream " << s << ": " << statuses[s].error_message();
    EXPECT_EQ(answered[s], kRequestsEach) << "stream " << s;
  }
  ExpectNoOpenStreams(stub.get());
}

}  // namespace
}  // namespace blocksel
