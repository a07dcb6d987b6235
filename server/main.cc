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
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/blocksel_server.h"
#include "server/config/config_file.h"
#include "server/version.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051",
          "Comma-separated listen addresses: host:port (port 0 picks one) or "
          "unix:/path/to.sock");
ABSL_FLAG(std::string, backend, "auto",
          "Selection backend: auto (GPU if built in and present, else cpu), "
          "cpu, cuda or hip");
ABSL_FLAG(int, cpu_threads, 0, "Threads of the cpu backend (0: one per core)");
ABSL_FLAG(int, gpu_device, 0, "GPU device index of the cuda / hip backend");
ABSL_FLAG(int, gpu_graph_max_batch, 256,
          "GPU decode graphs are captured at start for batch sizes 1, 2, 4, ... up to this "
          "(0: no graphs, direct launches only)");
ABSL_FLAG(int, gpu_graph_max_tokens, 4, "GPU decode graphs cover Q = 1 .. this");
ABSL_FLAG(int, num_layers, 60, "Layers of the model");
ABSL_FLAG(int, first_sparse_layer, 3,
          "First sparse layer; layers [first_sparse_layer, num_layers) have "
          "index keys");
ABSL_FLAG(int, num_heads, 4, "Index heads per query token (M3: max(1, 4/TP))");
ABSL_FLAG(int, head_dim, 128, "Elements per index key and query head");
ABSL_FLAG(std::string, key_dtype, "bf16", "Key dtype in the cache: bf16 or fp8_e4m3");
ABSL_FLAG(int, topk, 16, "Blocks selected per token and head");
ABSL_FLAG(int, init_blocks, 0, "Leading blocks always selected");
ABSL_FLAG(int, local_blocks, 1, "Trailing visible blocks always selected");
ABSL_FLAG(int64_t, max_positions, int64_t{1} << 20, "Longest sequence in tokens");
ABSL_FLAG(int64_t, cache_mib, 1024,
          "Key cache size in MiB over all sparse layers (the page count is "
          "this over the bytes of one page)");
ABSL_FLAG(int64_t, max_sequences, 65536, "Most sequences open at once");
ABSL_FLAG(int64_t, default_lease_seconds, 600,
          "Lease of a sequence opened without one: released when untouched "
          "this long");
ABSL_FLAG(int64_t, max_lease_seconds, 86400, "Longest lease a client may ask for");
ABSL_FLAG(int64_t, max_message_mib, 64, "Largest gRPC message, in MiB");
ABSL_FLAG(int, stream_max_inflight, 4,
          "Requests of one stream read ahead of their responses; past this the "
          "server stops reading the stream");
ABSL_FLAG(int64_t, grpc_memory_mib, 1024,
          "Memory gRPC may use for message buffers over all calls (a ResourceQuota); past "
          "it the server reads more slowly instead of growing");
ABSL_FLAG(int64_t, queue_capacity, 1024,
          "Engine operations waiting at most; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9464",
          "Where Prometheus metrics are served over HTTP (host:port, path /metrics; port 0 "
          "picks a free one); empty turns the endpoint off");
ABSL_FLAG(int64_t, batch_window_us, 0,
          "Cross-stream batching: decode batches of one layer arriving within this many "
          "microseconds of the first are merged into one backend launch (0: off). Adds up "
          "to this much latency; pays off when several workers share the server");
ABSL_FLAG(int64_t, batch_max_rows, 4096, "Most query rows one merged decode launch holds");
ABSL_FLAG(int64_t, drain_propagation_seconds, 5,
          "On SIGTERM/SIGINT, readiness turns NOT_SERVING first; the server keeps "
          "accepting calls this long so load balancers stop routing to it");
ABSL_FLAG(int64_t, shutdown_grace_seconds, 30,
          "After the propagation wait, calls already open get this long to finish "
          "before they are cancelled. A second signal forces exit at once");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");
ABSL_FLAG(std::string, snapshot_path, "",
          "Cache snapshot file: loaded at start (a damaged or mismatched one is refused and "
          "the server starts empty), written when draining and by the WriteSnapshot RPC");
ABSL_FLAG(std::string, config, "",
          "Optional JSON file: an object of option names (as above, without --) to "
          "values, e.g. {\"topk\": 16, \"key_dtype\": \"fp8_e4m3\"}. Options given on the "
          "command line win over the file");

namespace blocksel {
namespace {

// Exit status after a second SIGTERM/SIGINT cut the drain short.
constexpr int kForcedExitCode = 3;

// SIGTERM and SIGINT, blocked in every thread and taken by sigwait. Static:
// the signal-watching thread outlives Run.
sigset_t g_signals;

absl::StatusOr<ServerConfig> ConfigFromFlags() {
  ServerConfig config;
  config.model.num_layers = absl::GetFlag(FLAGS_num_layers);
  config.model.first_sparse_layer = absl::GetFlag(FLAGS_first_sparse_layer);
  config.model.num_heads = absl::GetFlag(FLAGS_num_heads);
  config.model.head_dim = absl::GetFlag(FLAGS_head_dim);
  absl::StatusOr<KeyDtype> dtype = ParseKeyDtype(absl::GetFlag(FLAGS_key_dtype));
  if (!dtype.ok()) return dtype.status();
  config.model.key_dtype = *dtype;
  config.model.topk = absl::GetFlag(FLAGS_topk);
  config.model.init_blocks = absl::GetFlag(FLAGS_init_blocks);
  config.model.local_blocks = absl::GetFlag(FLAGS_local_blocks);
  config.model.max_positions = absl::GetFlag(FLAGS_max_positions);
  config.backend.kind = absl::GetFlag(FLAGS_backend);
  config.backend.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  config.backend.gpu_device = absl::GetFlag(FLAGS_gpu_device);
  config.backend.gpu_graph_max_batch = absl::GetFlag(FLAGS_gpu_graph_max_batch);
  config.backend.gpu_graph_max_tokens = absl::GetFlag(FLAGS_gpu_graph_max_tokens);
  config.cache_bytes = absl::GetFlag(FLAGS_cache_mib) << 20;
  config.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  config.default_lease = absl::Seconds(absl::GetFlag(FLAGS_default_lease_seconds));
  config.max_lease = absl::Seconds(absl::GetFlag(FLAGS_max_lease_seconds));
  config.listen_addresses = absl::StrSplit(absl::GetFlag(FLAGS_listen), ',', absl::SkipEmpty());
  config.max_message_bytes = absl::GetFlag(FLAGS_max_message_mib) << 20;
  config.max_inflight_per_stream = absl::GetFlag(FLAGS_stream_max_inflight);
  config.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  config.grpc_memory_bytes = absl::GetFlag(FLAGS_grpc_memory_mib) << 20;
  config.batch_window = absl::Microseconds(absl::GetFlag(FLAGS_batch_window_us));
  config.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  config.batch_max_rows = absl::GetFlag(FLAGS_batch_max_rows);
  config.snapshot_path = absl::GetFlag(FLAGS_snapshot_path);
  absl::Status valid = config.Validate();
  if (!valid.ok()) return valid;
  return config;
}

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
  absl::StatusOr<ServerConfig> config = ConfigFromFlags();
  if (!config.ok()) {
    spdlog::error("invalid configuration: {}", std::string(config.status().message()));
    return 2;
  }
  spdlog::info("blocksel-server {}: model {}", kBlockselVersion, config->model.ToString());
  spdlog::info("effective configuration: {}", EffectiveFlags("server/main.cc"));
  spdlog::info("cache: {} pages of {} bytes ({} MiB), max {} sequences, lease {}s",
               config->NumPages(), config->model.PageBytes(), absl::GetFlag(FLAGS_cache_mib),
               config->max_sequences, absl::ToInt64Seconds(config->default_lease));
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
