// The server's Prometheus metrics (names in metric_names.h), served over
// HTTP on their own port.
#ifndef BLOCKSEL_SERVER_METRICS_SERVER_METRICS_H_
#define BLOCKSEL_SERVER_METRICS_SERVER_METRICS_H_

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/engine/engine_observer.h"
#include "server/engine/select_times.h"

namespace blocksel {

// The RPCs, as the requests counter and duration histogram label them.
enum class RpcMethod {
  kGetInfo,
  kOpenSequence,
  kReleaseSequence,
  kRenewLease,
  kAppendKeys,
  kStreamAppendKeys,
  kSelect,
  kStreamSelect,
  kWriteSnapshot,
  kAttach,
  kRenewAttachment,
  kDetach,
};
inline constexpr int kRpcMethods = 12;

// Every series is created up front (each method with each status code), so
// recording is a lookup in fixed arrays plus an atomic update, with no lock
// shared across series; only a histogram's own observation takes that
// histogram's mutex (prometheus-cpp 1.0).
//
// The stages of SelectTimes a co-located selection goes through before the
// worker has its answer: SelectStage kQueue up to kCompute.
inline constexpr int kColocatedStages = 4;

// Thread-safe.
class ServerMetrics final : public EngineObserver {
 public:
  // static_labels: the server_info metric's labels (version, backend,
  // model config). audit_layer_distances: the distances from each audited
  // layer to its source, whose reuse audit series exist from the start.
  explicit ServerMetrics(const std::map<std::string, std::string>& static_labels,
                         const std::vector<int32_t>& audit_layer_distances = {});
  ~ServerMetrics() override;

  // Serves /metrics on "host:port" (port 0 picks a free one).
  // UNAVAILABLE when the address cannot be bound.
  absl::Status Serve(const std::string& address);
  // The bound port, 0 when not serving.
  int port() const { return port_; }

  // The metrics in Prometheus' text format (what a scrape returns).
  std::string Text() const;

  // One request answered with `code` (a grpc::StatusCode value) after
  // `elapsed`, with its request and response sizes.
  void OnRequest(RpcMethod method, int code, absl::Duration elapsed, int64_t received_bytes,
                 int64_t sent_bytes);
  // The stages of one selection that was answered, times.written set.
  void OnSelectStages(const SelectTimes& times);
  // The server's stages of one selection a co-located worker got through
  // the GPU (queue, plan, upload, compute; the answer needs no host after
  // the launch).
  void OnColocatedStages(const SelectTimes& times);
  void OnStreamOpened() { open_streams_->Increment(); }
  void OnStreamClosed() { open_streams_->Decrement(); }

  // EngineObserver.
  void OnBackendSelect(SelectPath path, absl::Duration elapsed, int64_t requests,
                       int64_t rows) override;
  void OnBackendRunning(int delta) override { batches_running_->Increment(delta); }
  void OnKeysAppended(int64_t keys) override { appended_keys_->Increment(keys); }
  void OnCacheChanged(const CacheStats& stats) override;
  void OnQueueWait(absl::Duration wait) override;
  void OnQueueDepth(int64_t depth) override { queue_depth_->Set(static_cast<double>(depth)); }
  void OnReuseAudit(int32_t layer_distance, absl::Span<const double> overlaps) override;
  void OnReuseAuditSkipped(int32_t layer_distance) override;

 private:
  static constexpr int kStatusCodes = 17;  // gRPC's, OK = 0 to UNAUTHENTICATED = 16
  static constexpr int kSelectPaths = 3;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;

  std::array<prometheus::Histogram*, kRpcMethods> rpc_duration_{};
  std::array<std::array<prometheus::Counter*, kStatusCodes>, kRpcMethods> requests_{};
  prometheus::Histogram* queue_wait_ = nullptr;
  std::array<prometheus::Histogram*, kSelectPaths> backend_duration_{};
  std::array<prometheus::Histogram*, kSelectStages> stage_duration_{};
  // queue, plan, upload and compute of the co-located data plane.
  std::array<prometheus::Histogram*, kColocatedStages> colocated_stage_duration_{};
  prometheus::Histogram* backend_batch_requests_ = nullptr;
  prometheus::Counter* appended_keys_ = nullptr;
  prometheus::Counter* selected_rows_ = nullptr;
  prometheus::Counter* received_bytes_ = nullptr;
  prometheus::Counter* sent_bytes_ = nullptr;
  prometheus::Gauge* queue_depth_ = nullptr;
  prometheus::Gauge* batches_running_ = nullptr;
  prometheus::Gauge* cache_pages_used_ = nullptr;
  prometheus::Gauge* cache_pages_free_ = nullptr;
  prometheus::Gauge* cache_usage_ratio_ = nullptr;
  prometheus::Gauge* open_sequences_ = nullptr;
  prometheus::Gauge* open_streams_ = nullptr;
  // The reuse audit's series of one layer distance.
  struct AuditSeries {
    prometheus::Histogram* overlap = nullptr;
    prometheus::Counter* compared = nullptr;
    prometheus::Counter* skipped = nullptr;
  };
  // Filled by the constructor only, so reading it needs no lock.
  std::map<int32_t, AuditSeries> audit_series_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_METRICS_SERVER_METRICS_H_
