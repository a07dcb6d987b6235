// blocksel-server as a child process, for tests that need signals, exit
// codes or the real command line.
#ifndef BLOCKSEL_TESTS_SUPPORT_SERVER_PROCESS_H_
#define BLOCKSEL_TESTS_SUPPORT_SERVER_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace blocksel::testing {

using HealthStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

// Starts the server binary on a unix socket in a fresh folder, with a small
// model (4 layers, H=2, D=32, topk 4) on the CPU backend (or the one
// BLOCKSEL_TEST_BACKEND names), then
// extra_args (later arguments win). Its stdout and stderr go to a log file.
// The destructor kills a server still running and removes the folder.
class ServerProcess {
 public:
  ServerProcess(const std::string& binary, const std::vector<std::string>& extra_args);
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  const std::string& target() const { return target_; }
  const std::filesystem::path& folder() const { return folder_; }
  void Signal(int signal_number);
  // The exit status once the process exits within timeout; nullopt if it is
  // still running then, or died from a signal.
  std::optional<int> WaitExit(absl::Duration timeout);
  std::string Log() const;
  // Whether the log contains text within timeout (polled).
  bool AwaitLog(const std::string& text, absl::Duration timeout) const;
  // The server's resident set size (VmRSS), in bytes; -1 once it exited.
  int64_t ResidentBytes() const;

  // The health status of name ("" is liveness), UNKNOWN if unreachable.
  HealthStatus Health(const std::string& name) const;
  bool AwaitHealth(const std::string& name, HealthStatus want, absl::Duration timeout) const;

 private:
  std::filesystem::path folder_;
  std::string target_;
  pid_t pid_ = -1;
  bool exited_ = false;
  std::optional<int> exit_status_;
};

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_SERVER_PROCESS_H_
