// A running blocksel server: backend, engine, executor and gRPC server.
#ifndef BLOCKSEL_SERVER_BLOCKSEL_SERVER_H_
#define BLOCKSEL_SERVER_BLOCKSEL_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/colocated/colocated_hub.h"
#include "server/engine/backend_factory.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"
#include "server/engine/select_batcher.h"
#include "server/metrics/server_metrics.h"
#include "server/transport/block_selector_service.h"
#include "server/transport/completion_queue_poller.h"
#include "server/transport/select_stream_call.h"

namespace blocksel {

// Where the server listens and serves metrics unless told otherwise.
inline constexpr char kDefaultListenAddress[] = "0.0.0.0:50051";
inline constexpr char kDefaultMetricsAddress[] = "0.0.0.0:9464";

// Everything a server is started with. Each default is defined once, in the
// options of the component it configures; the flags take theirs from here.
struct ServerConfig {
  ModelConfig model;
  BackendOptions backend;
  int64_t cache_bytes = int64_t{1} << 30;  // key storage over all layers
  int64_t max_sequences = EngineOptions{}.max_sequences;
  absl::Duration default_lease = EngineOptions{}.default_lease;
  absl::Duration max_lease = EngineOptions{}.max_lease;
  // "host:port" (port 0 picks a free one) or "unix:/path/to/socket".
  std::vector<std::string> listen_addresses = {kDefaultListenAddress};
  int64_t max_message_bytes = ServiceOptions{}.max_message_bytes;
  int max_inflight_per_stream = ServiceOptions{}.max_inflight_per_stream;
  int stream_threads = ServiceOptions{}.stream_threads;
  int64_t queue_capacity = Executor::Options{}.queue_capacity;
  // How long the idle engine thread checks for work before it sleeps.
  absl::Duration engine_idle_spin = Executor::Options{}.idle_spin;
  // Cross-stream batching of decode selections (see SelectBatcher); a zero
  // window turns it off.
  absl::Duration batch_window = SelectBatcher::Options{}.window;
  int64_t batch_max_rows = SelectBatcher::Options{}.max_group_rows;
  // The co-located GPU data plane (GPU backends only).
  ColocatedOptions colocated;
  // Where the cache is loaded from at start and written to on Shutdown and
  // on request; empty: no snapshots.
  std::string snapshot_path;
  // Memory gRPC may use for buffers over all calls; past it, reading slows.
  int64_t grpc_memory_bytes = int64_t{1} << 30;
  // Prometheus metrics over HTTP at "host:port/metrics" (port 0 picks a
  // free one); empty: recorded but not served.
  std::string metrics_address = kDefaultMetricsAddress;

  // OK, or INVALID_ARGUMENT naming every bad value.
  absl::Status Validate() const;
  // The number of pages cache_bytes holds.
  int64_t NumPages() const { return cache_bytes / model.PageBytes(); }
};

// The health-check name whose status is readiness (grpc.health.v1; the
// empty name is liveness).
inline constexpr char kReadinessService[] = "blocksel.v1.BlockSelector";

// Thread-safe after Start.
class BlockselServer {
 public:
  // Creates the backend, reserves the cache and starts serving.
  static absl::StatusOr<std::unique_ptr<BlockselServer>> Start(const ServerConfig& config);
  ~BlockselServer();

  // Port bound for the first TCP listen address (0 if there is none).
  int port() const { return port_; }
  // Port serving /metrics (0 when not served).
  int metrics_port() const { return metrics_->port(); }
  const ServerMetrics& metrics() const { return *metrics_; }
  // Backend name and detail, e.g. "cpu (avx512, 2 threads)".
  const std::string& backend_description() const { return backend_description_; }

  // Readiness for load balancers and Kubernetes probes. Liveness stays
  // SERVING until Shutdown.
  void SetReady(bool ready);

  // Stops accepting calls, cancels the ones still open after grace, waits
  // for them, drains the executor, then writes the snapshot (NOT_FOUND
  // without a snapshot path). Once only.
  absl::StatusOr<SnapshotSummary> Shutdown(absl::Duration grace);

  // What loading the snapshot at start gave (NOT_FOUND: no path or no
  // file; other errors: the snapshot was refused and the cache is empty).
  const absl::StatusOr<SnapshotSummary>& loaded_snapshot() const { return loaded_snapshot_; }

  // Backend launches of selections so far, and how batching grouped them.
  int64_t select_launches() const { return engine_->select_launches(); }
  SelectBatcher::Stats batching_stats() const { return batcher_->stats(); }

 private:
  BlockselServer() = default;

  // Declared first: the engine and executor report to it until they are
  // destroyed.
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<SelectBatcher> batcher_;
  std::unique_ptr<ColocatedHub> colocated_;
  std::unique_ptr<BlockSelectorService> service_;
  // StreamSelect calls on completion queues: what they share, and the
  // threads serving the queues (after the server in destruction, as gRPC
  // wants the queues to outlive it).
  SelectStreamCall::Context stream_select_;
  std::unique_ptr<CompletionQueuePoller> poller_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string backend_description_;
  std::string snapshot_path_;
  absl::StatusOr<SnapshotSummary> loaded_snapshot_ = absl::NotFoundError("no --snapshot_path");
  bool shut_down_ = false;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_BLOCKSEL_SERVER_H_
