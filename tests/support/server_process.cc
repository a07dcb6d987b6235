#include "tests/support/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"

extern char** environ;

namespace blocksel::testing {
namespace {

std::atomic<int> next_folder{0};

// BLOCKSEL_TEST_BACKEND runs these tests on another backend (the GPU
// machine sets it to cuda); cpu by default.
std::string TestBackend() {
  const char* backend = std::getenv("BLOCKSEL_TEST_BACKEND");
  return backend != nullptr ? backend : "cpu";
}

}  // namespace

ServerProcess::ServerProcess(const std::string& binary,
                             const std::vector<std::string>& extra_args) {
  folder_ =
      std::filesystem::temp_directory_path() / ("blocksel_server_" + std::to_string(::getpid()) +
                                                "_" + std::to_string(next_folder.fetch_add(1)));
  std::filesystem::create_directories(folder_);
  target_ = "unix:" + (folder_ / "server.sock").string();
  // BLOCKSEL_SERVER_BINARY in the environment wins: tests copied to another
  // machine (the GPU machine) find the server there.
  const char* binary_override = std::getenv("BLOCKSEL_SERVER_BINARY");
  std::vector<std::string> args = {binary_override != nullptr ? binary_override : binary,
                                   "--listen=" + target_, "--num_layers=4",
                                   "--first_sparse_layer=1", "--num_heads=2", "--head_dim=32",
                                   "--topk=4", "--cache_mib=16",
                                   // Any free port: tests run in parallel.
                                   "--metrics_address=127.0.0.1:0", "--backend=" + TestBackend()};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const std::string log = (folder_ / "server.log").string();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ) != 0) pid_ = -1;
  posix_spawn_file_actions_destroy(&actions);
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !exited_) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  std::filesystem::remove_all(folder_);
}

void ServerProcess::Signal(int signal_number) {
  if (pid_ > 0 && !exited_) ::kill(pid_, signal_number);
}

std::optional<int> ServerProcess::WaitExit(absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  while (!exited_ && pid_ > 0 && absl::Now() < give_up) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      if (WIFEXITED(status)) exit_status_ = WEXITSTATUS(status);
      break;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return exit_status_;
}

std::string ServerProcess::Log() const {
  std::ifstream file(folder_ / "server.log");
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

bool ServerProcess::AwaitLog(const std::string& text, absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  while (Log().find(text) == std::string::npos) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

int64_t ServerProcess::ResidentBytes() const {
  if (pid_ <= 0 || exited_) return -1;
  std::ifstream status("/proc/" + std::to_string(pid_) + "/status");
  std::string field;
  while (status >> field) {
    if (field == "VmRSS:") {
      int64_t kib = 0;
      status >> kib;
      return kib * 1024;
    }
  }
  return -1;
}

HealthStatus ServerProcess::Health(const std::string& name) const {
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

bool ServerProcess::AwaitHealth(const std::string& name, HealthStatus want,
                                absl::Duration timeout) const {
  const absl::Time give_up = absl::Now() + timeout;
  while (absl::Now() < give_up) {
    if (Health(name) == want) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

}  // namespace blocksel::testing
