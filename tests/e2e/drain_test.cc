// A real blocksel-server child process: liveness and readiness through
// grpc.health.v1, the SIGTERM drain, and the forced exit on a second signal.
#include <signal.h>

#include <string>
#include <vector>

#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "gtest/gtest.h"
#include "tests/support/server_process.h"

namespace blocksel {
namespace {

using testing::ServerProcess;

constexpr int kForcedExitCode = 3;  // server/main.cc

std::vector<std::string> DrainArgs(int propagation_seconds, int grace_seconds) {
  return {"--log_level=warn", "--drain_propagation_seconds=" + std::to_string(propagation_seconds),
          "--shutdown_grace_seconds=" + std::to_string(grace_seconds)};
}

constexpr auto kServing = grpc::health::v1::HealthCheckResponse::SERVING;
constexpr auto kNotServing = grpc::health::v1::HealthCheckResponse::NOT_SERVING;
constexpr char kReadiness[] = "blocksel.v1.BlockSelector";

v1::SelectRequest DecodeRequest(uint64_t sequence, uint64_t request_id) {
  v1::SelectRequest request;
  request.set_request_id(request_id);
  request.set_layer(1);
  v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
  decode->set_sequence_id(sequence);
  decode->set_seq_len(1);
  decode->set_keys(EncodeBf16(std::vector<float>(32, 0.5f)));
  request.set_queries(EncodeBf16(std::vector<float>(2 * 32, 1.0f)));
  return request;
}

TEST(Drain, LivenessAndReadinessServeOnceStarted) {
  ServerProcess server(BLOCKSEL_SERVER_BINARY, DrainArgs(0, 5));
  ASSERT_TRUE(server.AwaitHealth("", kServing, absl::Seconds(30)));
  EXPECT_EQ(server.Health(kReadiness), kServing);
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(absl::Seconds(20)), 0);
}

TEST(Drain, SigtermTurnsReadinessOffWhileCallsAreStillServed) {
  ServerProcess server(BLOCKSEL_SERVER_BINARY, DrainArgs(4, 5));
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kServing, absl::Seconds(30)));
  BlockselClient client(server.target());
  absl::StatusOr<uint64_t> sequence = client.OpenSequence();
  ASSERT_TRUE(sequence.ok()) << sequence.status();
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client.StartSelectSession();
  ASSERT_TRUE(session.ok());

  server.Signal(SIGTERM);
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kNotServing, absl::Seconds(3)));
  // Liveness stays up, and the open stream and new calls are still answered
  // during the propagation wait.
  EXPECT_EQ(server.Health(""), kServing);
  absl::StatusOr<SelectResult> answered = (*session)->Call(DecodeRequest(*sequence, 7));
  ASSERT_TRUE(answered.ok()) << answered.status();
  EXPECT_EQ(answered->request_id, 7u);
  EXPECT_EQ(answered->at(0, 0, 0), 0);  // the only visible block
  EXPECT_TRUE(client.GetInfo().ok());
  EXPECT_TRUE((*session)->Close().ok());
  EXPECT_EQ(server.WaitExit(absl::Seconds(20)), 0);
}

TEST(Drain, SecondSignalForcesExit) {
  ServerProcess server(BLOCKSEL_SERVER_BINARY, DrainArgs(60, 60));
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kServing, absl::Seconds(30)));
  server.Signal(SIGTERM);
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kNotServing, absl::Seconds(3)));
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(absl::Seconds(5)), kForcedExitCode);
}

}  // namespace
}  // namespace blocksel
