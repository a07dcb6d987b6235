// blocksel-server: serves blocksel.v1.BlockSelector until SIGTERM or SIGINT.
#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/blocksel_server.h"
#include "server/config/config_file.h"
#include "server/config/server_flags.h"
#include "server/version.h"
#include "spdlog/spdlog.h"

namespace blocksel {
namespace {

// Exit status after a second SIGTERM/SIGINT cut the drain short.
constexpr int kForcedExitCode = 3;

// SIGTERM and SIGINT, blocked in every thread and taken by sigwait. Static:
// the signal-watching thread outlives Run.
sigset_t g_signals;

int Run(const absl::flat_hash_set<std::string>& on_command_line) {
  // Signals are taken by a dedicated thread with sigwait. They are blocked
  // before gRPC starts its threads, so no gRPC thread ever runs a handler
  // (Shutdown from a handler deadlocks on gRPC's own mutexes).
  sigemptyset(&g_signals);
  sigaddset(&g_signals, SIGINT);
  sigaddset(&g_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &g_signals, nullptr);

  if (!absl::GetFlag(FLAGS_config).empty()) {
    absl::Status applied = ApplyConfigFile(absl::GetFlag(FLAGS_config), on_command_line);
    if (!applied.ok()) {
      spdlog::error("invalid configuration: {}", std::string(applied.message()));
      return 2;
    }
  }
  spdlog::set_level(spdlog::level::from_str(absl::GetFlag(FLAGS_log_level)));
  absl::StatusOr<ServerConfig> config = ServerConfigFromFlags();
  if (!config.ok()) {
    spdlog::error("invalid configuration: {}", std::string(config.status().message()));
    return 2;
  }
  spdlog::info("blocksel-server {}: model {}", kBlockselVersion, config->model.ToString());
  spdlog::info("effective configuration: {}", EffectiveFlags(kServerFlagsFile));
  spdlog::info(
      "cache: {} pages of {} bytes ({} of {} sparse layers store keys; {} MiB), max {} "
      "sequences, lease {}s",
      config->NumPages(), config->model.PageBytes(), config->model.num_key_layers(),
      config->model.num_sparse_layers(), absl::GetFlag(FLAGS_cache_mib), config->max_sequences,
      absl::ToInt64Seconds(config->default_lease));
  if (!config->model.audited_layers.empty()) {
    const ModelConfig& model = config->model;
    spdlog::info(
        "reuse audit of layers {}, selected on one in {} of their audit batches: {} bytes of "
        "keys per token per audited layer, {} of the {} bytes per token the cache stores",
        absl::StrJoin(model.audited_layers, ","), model.audit_every, model.TokenBytes(),
        model.TokenBytes() * static_cast<int64_t>(model.audited_layers.size()),
        model.TokenBytes() * model.num_key_layers());
  }
  absl::StatusOr<std::unique_ptr<BlockselServer>> server = BlockselServer::Start(*config);
  if (!server.ok()) {
    spdlog::error("cannot start: {}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info("backend {}", (*server)->backend_description());
  const absl::StatusOr<SnapshotSummary>& loaded = (*server)->loaded_snapshot();
  if (loaded.ok()) {
    spdlog::info("snapshot restored: {} sequences ({} bytes)", loaded->sequences, loaded->bytes);
  } else if (!absl::IsNotFound(loaded.status())) {
    spdlog::warn("snapshot refused, starting empty: {}", std::string(loaded.status().message()));
  }
  spdlog::info("serving on {} (port {})", absl::GetFlag(FLAGS_listen), (*server)->port());
  if ((*server)->metrics_port() != 0) {
    spdlog::info("metrics on http://{}/metrics (port {})", absl::GetFlag(FLAGS_metrics_address),
                 (*server)->metrics_port());
  }

  const absl::Duration propagation = absl::Seconds(absl::GetFlag(FLAGS_drain_propagation_seconds));
  const absl::Duration grace = absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_seconds));
  BlockselServer* serving = server->get();
  // Drain: readiness NOT_SERVING at the first signal, a wait so balancers
  // notice, then stop accepting and give open calls the grace period. The
  // signal thread stays on watch: a second signal ends the process at once.
  absl::Notification drain_requested;
  std::thread signal_thread([serving, &drain_requested] {
    int signal_number = 0;
    sigwait(&g_signals, &signal_number);
    spdlog::info("signal {}: draining, readiness NOT_SERVING", signal_number);
    serving->SetReady(false);
    drain_requested.Notify();
    sigwait(&g_signals, &signal_number);
    spdlog::warn("signal {} during drain: forced exit", signal_number);
    std::_Exit(kForcedExitCode);
  });
  signal_thread.detach();  // blocked in sigwait until the process ends
  drain_requested.WaitForNotification();
  absl::SleepFor(propagation);
  spdlog::info("propagation wait over: no new calls; open calls get {}s",
               absl::ToInt64Seconds(grace));
  const absl::StatusOr<SnapshotSummary> written = serving->Shutdown(grace);
  if (written.ok()) {
    spdlog::info("snapshot written: {} sequences ({} bytes)", written->sequences, written->bytes);
  } else if (!absl::IsNotFound(written.status())) {
    spdlog::error("snapshot not written: {}", std::string(written.status().message()));
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves blocksel.v1.BlockSelector: paged index-key cache and top-k block "
      "selection for sparse attention.\nUsage: blocksel-server [--flag=value]...");
  const absl::flat_hash_set<std::string> on_command_line = blocksel::FlagsOnCommandLine(argc, argv);
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run(on_command_line);
}
