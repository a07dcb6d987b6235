#include "server/metrics/server_metrics.h"

#include <exception>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"
#include "server/metrics/metric_names.h"

namespace blocksel {
namespace {

constexpr std::array<const char*, kRpcMethods> kMethodNames = {
    "GetInfo",       "OpenSequence",     "ReleaseSequence", "RenewLease",
    "AppendKeys",    "StreamAppendKeys", "Select",          "StreamSelect",
    "WriteSnapshot", "Attach",           "RenewAttachment", "Detach"};

// gRPC's status code names, indexed by code.
constexpr std::array<const char*, 17> kCodeNames = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

constexpr std::array<const char*, 3> kPathNames = {"prefill", "decode_graph", "decode_direct"};

// Bucket bounds in seconds: from tens of microseconds (a GPU decode) to
// seconds (a long prefill on the CPU, a deep queue).
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01,
          0.025,  0.05, 0.1,  0.25,   0.5,  1,    2.5,    5,    10};
}

// Bucket bounds in seconds of one stage of a selection: from a microsecond
// (handing a request to the queue) to seconds (a long CPU prefill).
prometheus::Histogram::BucketBoundaries StageBuckets() {
  return {1e-6, 2.5e-6, 5e-6,  1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
          5e-3, 0.01,   0.025, 0.05, 0.1,    0.25, 0.5,  1,      2.5,  5,    10};
}

// Bucket bounds of a reuse overlap, a share in [0, 1]: finest near 1, where
// reuse is cheap and a drop matters.
prometheus::Histogram::BucketBoundaries OverlapBuckets() {
  return {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0};
}

}  // namespace

ServerMetrics::ServerMetrics(const std::map<std::string, std::string>& static_labels,
                             const std::vector<int32_t>& audit_layer_distances)
    : registry_(std::make_shared<prometheus::Registry>()) {
  auto& rpc_duration =
      prometheus::BuildHistogram()
          .Name(metric_names::kRpcDuration)
          .Help(
              "Time from a request's arrival to its answer, by RPC method; each message of a "
              "stream is one request")
          .Register(*registry_);
  auto& requests = prometheus::BuildCounter()
                       .Name(metric_names::kRequests)
                       .Help(
                           "Requests answered, by RPC method and gRPC status code (in-band "
                           "stream errors count with their code)")
                       .Register(*registry_);
  for (int m = 0; m < kRpcMethods; ++m) {
    rpc_duration_[m] = &rpc_duration.Add({{"method", kMethodNames[m]}}, LatencyBuckets());
    for (int c = 0; c < kStatusCodes; ++c) {
      requests_[m][c] = &requests.Add({{"method", kMethodNames[m]}, {"code", kCodeNames[c]}});
    }
  }
  queue_wait_ = &prometheus::BuildHistogram()
                     .Name(metric_names::kQueueWait)
                     .Help("Time an operation waited in the engine queue")
                     .Register(*registry_)
                     .Add({}, LatencyBuckets());
  auto& backend_duration = prometheus::BuildHistogram()
                               .Name(metric_names::kBackendDuration)
                               .Help("Backend time of one selection, by path")
                               .Register(*registry_);
  for (int p = 0; p < kSelectPaths; ++p) {
    backend_duration_[p] = &backend_duration.Add({{"path", kPathNames[p]}}, LatencyBuckets());
  }
  auto& stage_duration =
      prometheus::BuildHistogram()
          .Name(metric_names::kSelectStageDuration)
          .Help(
              "Time one answered selection spent in each stage, from its arrival to its answer "
              "written: receive, queue, plan, upload, compute, download, respond")
          .Register(*registry_);
  for (int s = 0; s < kSelectStages; ++s) {
    stage_duration_[s] = &stage_duration.Add({{"stage", kSelectStageNames[s]}}, StageBuckets());
  }
  auto& colocated_stage_duration =
      prometheus::BuildHistogram()
          .Name(metric_names::kColocatedStageDuration)
          .Help(
              "Time one selection of a co-located worker spent in each server stage before its "
              "answer was on the GPU: queue, plan, upload, compute")
          .Register(*registry_);
  for (int s = 0; s < kColocatedStages; ++s) {
    colocated_stage_duration_[s] = &colocated_stage_duration.Add(
        {{"stage", kSelectStageNames[static_cast<int>(SelectStage::kQueue) + s]}}, StageBuckets());
  }
  backend_batch_requests_ =
      &prometheus::BuildHistogram()
           .Name(metric_names::kBackendBatchRequests)
           .Help("Requests one backend selection served (above 1 when batched across streams)")
           .Register(*registry_)
           .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256});
  auto counter = [this](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Add({});
  };
  appended_keys_ =
      counter(metric_names::kAppendedKeys, "Index keys written to the cache (tokens times layers)");
  selected_rows_ = counter(metric_names::kSelectedRows, "Query rows selected by the backend");
  received_bytes_ = counter(metric_names::kReceivedBytes, "Bytes of request messages received");
  sent_bytes_ = counter(metric_names::kSentBytes, "Bytes of response messages sent");
  auto gauge = [this](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_).Add({});
  };
  queue_depth_ = gauge(metric_names::kQueueDepth, "Operations waiting in the engine queue");
  batches_running_ = gauge(metric_names::kBatchesRunning, "Selections running on the backend");
  cache_pages_used_ = gauge(metric_names::kCachePagesUsed, "Cache pages holding keys");
  cache_pages_free_ = gauge(metric_names::kCachePagesFree, "Cache pages free");
  cache_usage_ratio_ = gauge(metric_names::kCacheUsageRatio, "Cache pages used over all pages");
  open_sequences_ = gauge(metric_names::kOpenSequences, "Sequences open in the cache");
  open_streams_ = gauge(metric_names::kOpenStreams, "StreamSelect and StreamAppendKeys calls open");
  if (!audit_layer_distances.empty()) {
    auto& overlap = prometheus::BuildHistogram()
                        .Name(metric_names::kReuseOverlap)
                        .Help(
                            "Reuse audit: per (head, row), the share of the source layer's blocks "
                            "that the audited layer selects itself, by layer distance")
                        .Register(*registry_);
    auto& audits = prometheus::BuildCounter()
                       .Name(metric_names::kReuseAudits)
                       .Help(
                           "Reuse audits of one sequence, by layer distance and result: compared, "
                           "or skipped when the source had no selection at the same positions")
                       .Register(*registry_);
    for (const int32_t distance : audit_layer_distances) {
      const std::string label = absl::StrCat(distance);
      audit_series_[distance] = {&overlap.Add({{"layer_distance", label}}, OverlapBuckets()),
                                 &audits.Add({{"layer_distance", label}, {"result", "compared"}}),
                                 &audits.Add({{"layer_distance", label}, {"result", "skipped"}})};
    }
  }
  prometheus::BuildGauge()
      .Name(metric_names::kServerInfo)
      .Help("Always 1; the labels are the server version, backend and model config")
      .Register(*registry_)
      .Add(prometheus::Labels(static_labels.begin(), static_labels.end()))
      .Set(1);
}

ServerMetrics::~ServerMetrics() = default;

absl::Status ServerMetrics::Serve(const std::string& address) {
  // prometheus-cpp reports a failed bind by throwing; it stops here.
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& error) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", error.what()));
  }
  exposer_->RegisterCollectable(registry_);
  const std::vector<int> ports = exposer_->GetListeningPorts();
  port_ = ports.empty() ? 0 : ports.front();
  return absl::OkStatus();
}

std::string ServerMetrics::Text() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

void ServerMetrics::OnRequest(RpcMethod method, int code, absl::Duration elapsed,
                              int64_t received_bytes, int64_t sent_bytes) {
  const int m = static_cast<int>(method);
  const int c = code >= 0 && code < kStatusCodes ? code : 2;  // UNKNOWN
  requests_[m][c]->Increment();
  rpc_duration_[m]->Observe(absl::ToDoubleSeconds(elapsed));
  received_bytes_->Increment(static_cast<double>(received_bytes));
  sent_bytes_->Increment(static_cast<double>(sent_bytes));
}

void ServerMetrics::OnBackendSelect(SelectPath path, absl::Duration elapsed, int64_t requests,
                                    int64_t rows) {
  backend_duration_[static_cast<int>(path)]->Observe(absl::ToDoubleSeconds(elapsed));
  backend_batch_requests_->Observe(static_cast<double>(requests));
  selected_rows_->Increment(static_cast<double>(rows));
}

void ServerMetrics::OnSelectStages(const SelectTimes& times) {
  const std::array<absl::Duration, kSelectStages> stages = times.Stages();
  for (int s = 0; s < kSelectStages; ++s) {
    stage_duration_[s]->Observe(absl::ToDoubleSeconds(stages[s]));
  }
}

void ServerMetrics::OnColocatedStages(const SelectTimes& times) {
  const std::array<absl::Duration, kSelectStages> stages = times.Stages();
  for (int s = 0; s < kColocatedStages; ++s) {
    colocated_stage_duration_[s]->Observe(
        absl::ToDoubleSeconds(stages[static_cast<int>(SelectStage::kQueue) + s]));
  }
}

void ServerMetrics::OnCacheChanged(const CacheStats& stats) {
  const double used = static_cast<double>(stats.total_pages - stats.free_pages);
  cache_pages_used_->Set(used);
  cache_pages_free_->Set(static_cast<double>(stats.free_pages));
  cache_usage_ratio_->Set(stats.total_pages > 0 ? used / static_cast<double>(stats.total_pages)
                                                : 0.0);
  open_sequences_->Set(static_cast<double>(stats.open_sequences));
}

void ServerMetrics::OnReuseAudit(int32_t layer_distance, absl::Span<const double> overlaps) {
  const auto series = audit_series_.find(layer_distance);
  if (series == audit_series_.end()) return;
  for (const double overlap : overlaps) series->second.overlap->Observe(overlap);
  series->second.compared->Increment();
}

void ServerMetrics::OnReuseAuditSkipped(int32_t layer_distance) {
  const auto series = audit_series_.find(layer_distance);
  if (series != audit_series_.end()) series->second.skipped->Increment();
}

void ServerMetrics::OnQueueWait(absl::Duration wait) {
  queue_wait_->Observe(absl::ToDoubleSeconds(wait));
}

}  // namespace blocksel
