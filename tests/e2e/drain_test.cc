// A real blocksel-server child process: liveness and readiness through
// grpc.health.v1, the SIGTERM drain, and the forced exit on a second signal.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"

extern char** environ;

namespace blocksel {
namespace {

using HealthStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

constexpr int kForcedExitCode = 3;  // server/main.cc

// blocksel-server on a unix socket in a fresh folder, small model.
class ServerProcess {
 public:
  ServerProcess(int propagation_seconds, int grace_seconds) {
    folder_ = std::filesystem::temp_directory_path() /
              ("blocksel_drain_" + std::to_string(::getpid()) + "_" + std::to_string(++count_));
    std::filesystem::create_directories(folder_);
    target_ = "unix:" + (folder_ / "server.sock").string();
    std::vector<std::string> args = {
        BLOCKSEL_SERVER_BINARY,
        "--listen=" + target_,
        "--num_layers=4",
        "--first_sparse_layer=1",
        "--num_heads=2",
        "--head_dim=32",
        "--topk=4",
        "--cache_mib=16",
        "--backend=cpu",
        "--log_level=warn",
        "--drain_propagation_seconds=" + std::to_string(propagation_seconds),
        "--shutdown_grace_seconds=" + std::to_string(grace_seconds)};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  }

  ~ServerProcess() {
    if (pid_ > 0 && !exit_status_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    std::filesystem::remove_all(folder_);
  }

  const std::string& target() const { return target_; }
  void Signal(int signal_number) { ::kill(pid_, signal_number); }

  // The exit status once the process ends within timeout; nullopt if it
  // is still running (or died from a signal).
  std::optional<int> WaitExit(absl::Duration timeout) {
    const absl::Time give_up = absl::Now() + timeout;
    while (absl::Now() < give_up) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        if (WIFEXITED(status)) exit_status_ = WEXITSTATUS(status);
        return exit_status_;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return std::nullopt;
  }

  // The health status of name ("" is liveness), or UNKNOWN if unreachable.
  HealthStatus Health(const std::string& name) const {
    auto stub = grpc::health::v1::Health::NewStub(
        grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(name);
    grpc::health::v1::HealthCheckResponse response;
    if (!stub->Check(&context, request, &response).ok()) {
      return grpc::health::v1::HealthCheckResponse::UNKNOWN;
    }
    return response.status();
  }

  // Waits until name reports want, for up to timeout.
  bool AwaitHealth(const std::string& name, HealthStatus want, absl::Duration timeout) const {
    const absl::Time give_up = absl::Now() + timeout;
    while (absl::Now() < give_up) {
      if (Health(name) == want) return true;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return false;
  }

 private:
  static inline int count_ = 0;
  std::filesystem::path folder_;
  std::string target_;
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
};

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
  ServerProcess server(/*propagation_seconds=*/0, /*grace_seconds=*/5);
  ASSERT_TRUE(server.AwaitHealth("", kServing, absl::Seconds(30)));
  EXPECT_EQ(server.Health(kReadiness), kServing);
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(absl::Seconds(20)), 0);
}

TEST(Drain, SigtermTurnsReadinessOffWhileCallsAreStillServed) {
  ServerProcess server(/*propagation_seconds=*/4, /*grace_seconds=*/5);
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
  ServerProcess server(/*propagation_seconds=*/60, /*grace_seconds=*/60);
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kServing, absl::Seconds(30)));
  server.Signal(SIGTERM);
  ASSERT_TRUE(server.AwaitHealth(kReadiness, kNotServing, absl::Seconds(3)));
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(absl::Seconds(5)), kForcedExitCode);
}

}  // namespace
}  // namespace blocksel
