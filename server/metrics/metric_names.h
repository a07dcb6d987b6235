// Every metric the server exports, in one place. Names follow Prometheus'
// rules: the blocksel_ prefix, base units (_seconds, _bytes), and _total on
// counters only.
#ifndef BLOCKSEL_SERVER_METRICS_METRIC_NAMES_H_
#define BLOCKSEL_SERVER_METRICS_METRIC_NAMES_H_

namespace blocksel::metric_names {

// Histograms.
// Time from a request's arrival to its answer, per RPC method (each
// message of a stream counts as one request).
inline constexpr char kRpcDuration[] = "blocksel_rpc_duration_seconds";
// Time an operation waited in the engine queue.
inline constexpr char kQueueWait[] = "blocksel_queue_wait_seconds";
// Backend time of one selection, by path (prefill, decode_graph,
// decode_direct).
inline constexpr char kBackendDuration[] = "blocksel_backend_duration_seconds";
// Time one answered selection spent in each stage (label stage: receive,
// queue, plan, upload, compute, download, respond; see select_times.h).
inline constexpr char kSelectStageDuration[] = "blocksel_select_stage_seconds";
inline constexpr char kColocatedStageDuration[] = "blocksel_colocated_stage_seconds";
// Requests one backend selection served (above 1 when batched).
inline constexpr char kBackendBatchRequests[] = "blocksel_backend_batch_requests";
// Reuse audit: per (head, row) of an audited selection, the share of its
// source layer's blocks the audited layer selects itself (label
// layer_distance: audited layer - source layer).
inline constexpr char kReuseOverlap[] = "blocksel_reuse_overlap";

// Counters.
inline constexpr char kRequests[] = "blocksel_requests_total";           // method, code
inline constexpr char kAppendedKeys[] = "blocksel_appended_keys_total";  // tokens x layers
inline constexpr char kSelectedRows[] = "blocksel_selected_rows_total";  // query rows
inline constexpr char kReceivedBytes[] = "blocksel_received_bytes_total";
inline constexpr char kSentBytes[] = "blocksel_sent_bytes_total";
// Reuse audits of one sequence, by layer_distance and result (compared, or
// skipped: the source had no selection at the same positions).
inline constexpr char kReuseAudits[] = "blocksel_reuse_audits_total";

// Gauges.
inline constexpr char kQueueDepth[] = "blocksel_queue_depth";
inline constexpr char kBatchesRunning[] = "blocksel_batches_running";
inline constexpr char kCachePagesUsed[] = "blocksel_cache_pages_used";
inline constexpr char kCachePagesFree[] = "blocksel_cache_pages_free";
inline constexpr char kCacheUsageRatio[] = "blocksel_cache_usage_ratio";
inline constexpr char kOpenSequences[] = "blocksel_open_sequences";
inline constexpr char kOpenStreams[] = "blocksel_open_streams";
// Always 1; the labels carry the version, backend and model config.
inline constexpr char kServerInfo[] = "blocksel_server_info";

}  // namespace blocksel::metric_names

#endif  // BLOCKSEL_SERVER_METRICS_METRIC_NAMES_H_
