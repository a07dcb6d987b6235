#include "server/config/server_flags.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"

namespace {
// Every flag's default.
const blocksel::ServerConfig kDefaults;
}  // namespace

ABSL_FLAG(std::string, listen, blocksel::kDefaultListenAddress,
          "Comma-separated listen addresses: host:port (port 0 picks one) or "
          "unix:/path/to.sock");
ABSL_FLAG(std::string, backend, kDefaults.backend.kind,
          "Selection backend: auto (GPU if built in and present, else cpu), "
          "cpu, cuda or hip");
ABSL_FLAG(int, cpu_threads, kDefaults.backend.cpu_threads,
          "Threads of the cpu backend (0: one per core)");
ABSL_FLAG(int, gpu_device, kDefaults.backend.gpu_device,
          "GPU device index of the cuda / hip backend");
ABSL_FLAG(int, gpu_graph_max_batch, kDefaults.backend.gpu_graph_max_batch,
          "GPU decode graphs are captured at start for batch sizes 1, 2, 4, ... up to this "
          "(0: no graphs, direct launches only)");
ABSL_FLAG(int, gpu_graph_max_tokens, kDefaults.backend.gpu_graph_max_tokens,
          "GPU decode graphs cover Q = 1 .. this");
ABSL_FLAG(int, num_layers, kDefaults.model.num_layers, "Layers of the model");
ABSL_FLAG(int, first_sparse_layer, kDefaults.model.first_sparse_layer,
          "First sparse layer; layers [first_sparse_layer, num_layers) have "
          "index keys");
ABSL_FLAG(int, num_heads, kDefaults.model.num_heads,
          "Index heads per query token (M3: max(1, 4/TP))");
ABSL_FLAG(int, head_dim, kDefaults.model.head_dim, "Elements per index key and query head");
ABSL_FLAG(std::string, key_dtype, std::string(blocksel::KeyDtypeName(kDefaults.model.key_dtype)),
          "Key dtype in the cache: bf16 or fp8_e4m3");
ABSL_FLAG(int, topk, kDefaults.model.topk, "Blocks selected per token and head");
ABSL_FLAG(int, init_blocks, kDefaults.model.init_blocks, "Leading blocks always selected");
ABSL_FLAG(int, local_blocks, kDefaults.model.local_blocks,
          "Trailing visible blocks always selected");
ABSL_FLAG(int64_t, max_positions, kDefaults.model.max_positions, "Longest sequence in tokens");
ABSL_FLAG(int, select_every, 1,
          "Selection reuse: sparse layers first_sparse_layer, +K, +2K, ... select and every "
          "other sparse layer reuses the selection of the nearest one before it, storing no "
          "index keys (1: every sparse layer selects)");
ABSL_FLAG(std::string, selecting_layers, "",
          "Selection reuse by list instead of --select_every: the selecting layers, "
          "comma-separated and ascending from first_sparse_layer (e.g. 3,7,11)");
ABSL_FLAG(std::string, audit_layers, "",
          "Reuse audit: reusing sparse layers (comma-separated, ascending) whose index keys "
          "are stored too, so that the server can compare their own selection with the one "
          "they reuse (metric blocksel_reuse_overlap); each costs one more layer of cache per "
          "token. Empty: no audit");
ABSL_FLAG(int, audit_every, kDefaults.model.audit_every,
          "Reuse audit: select for an audited layer on one in this many of its audit batches "
          "(the others only store their keys)");
ABSL_FLAG(int64_t, cache_mib, kDefaults.cache_bytes >> 20,
          "Key cache size in MiB over all layers that store keys, the selecting and the "
          "audited ones (the page count is "
          "this over the bytes of one page)");
ABSL_FLAG(int64_t, max_sequences, kDefaults.max_sequences, "Most sequences open at once");
ABSL_FLAG(int64_t, default_lease_seconds, absl::ToInt64Seconds(kDefaults.default_lease),
          "Lease of a sequence opened without one: released when untouched "
          "this long");
ABSL_FLAG(int64_t, max_lease_seconds, absl::ToInt64Seconds(kDefaults.max_lease),
          "Longest lease a client may ask for");
ABSL_FLAG(int64_t, max_message_mib, kDefaults.max_message_bytes >> 20,
          "Largest gRPC message, in MiB");
ABSL_FLAG(int, stream_max_inflight, kDefaults.max_inflight_per_stream,
          "Requests of one stream read ahead of their responses; past this the "
          "server stops reading the stream");
ABSL_FLAG(int, stream_threads, kDefaults.stream_threads,
          "Threads serving StreamSelect calls, each polling its own completion queue; the thread "
          "that reads a request also hands it to the engine, with no hop between");
ABSL_FLAG(int64_t, grpc_memory_mib, kDefaults.grpc_memory_bytes >> 20,
          "Memory gRPC may use for message buffers over all calls (a ResourceQuota); past "
          "it the server reads more slowly instead of growing");
ABSL_FLAG(int64_t, queue_capacity, kDefaults.queue_capacity,
          "Engine operations waiting at most; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, engine_idle_spin_us, absl::ToInt64Microseconds(kDefaults.engine_idle_spin),
          "How long the idle engine thread keeps checking for work before it sleeps: a request "
          "arriving meanwhile skips a thread wake-up (about 10 us), at the cost of a busy core "
          "this long after each request (0: sleep at once)");
ABSL_FLAG(std::string, metrics_address, kDefaults.metrics_address,
          "Where Prometheus metrics are served over HTTP (host:port, path /metrics; port 0 "
          "picks a free one); empty turns the endpoint off");
ABSL_FLAG(int64_t, batch_window_us, absl::ToInt64Microseconds(kDefaults.batch_window),
          "Cross-stream batching: decode batches of one layer arriving within this many "
          "microseconds of the first are merged into one backend launch (0: off). Adds up "
          "to this much latency; pays off when several workers share the server");
ABSL_FLAG(int64_t, batch_max_rows, kDefaults.batch_max_rows,
          "Most query rows one merged decode launch holds");
ABSL_FLAG(int, colocated_max_attachments, kDefaults.colocated.max_attachments,
          "Co-located workers attached at once (GPU backends; 0 refuses every attach)");
ABSL_FLAG(int64_t, colocated_max_region_mib, kDefaults.colocated.max_region_bytes >> 20,
          "GPU memory one co-located worker's slots may take, in MiB");
ABSL_FLAG(int64_t, drain_propagation_seconds, 5,
          "On SIGTERM/SIGINT, readiness turns NOT_SERVING first; the server keeps "
          "accepting calls this long so load balancers stop routing to it");
ABSL_FLAG(int64_t, shutdown_grace_seconds, 30,
          "After the propagation wait, calls already open get this long to finish "
          "before they are cancelled. A second signal forces exit at once");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");
ABSL_FLAG(std::string, snapshot_path, kDefaults.snapshot_path,
          "Cache snapshot file: loaded at start (a damaged or mismatched one is refused and "
          "the server starts empty), written when draining and by the WriteSnapshot RPC");
ABSL_FLAG(std::string, config, "",
          "Optional JSON file: an object of option names (as above, without --) to "
          "values, e.g. {\"topk\": 16, \"key_dtype\": \"fp8_e4m3\"}. Options given on the "
          "command line win over the file");

namespace blocksel {

absl::StatusOr<ServerConfig> ServerConfigFromFlags() {
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
  const int select_every = absl::GetFlag(FLAGS_select_every);
  const std::string selecting_layers = absl::GetFlag(FLAGS_selecting_layers);
  if (select_every != 1 && !selecting_layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--select_every=", select_every,
                                                   " and --selecting_layers=", selecting_layers,
                                                   " both set the selecting layers; set one"));
  }
  if (select_every < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--select_every must be >= 1, got ", select_every));
  }
  if (select_every > 1) {
    config.model.selecting_layers =
        EveryKthLayer(config.model.first_sparse_layer, config.model.num_layers, select_every);
  } else if (!selecting_layers.empty()) {
    absl::StatusOr<std::vector<int32_t>> layers = ParseLayerList(selecting_layers);
    if (!layers.ok()) return layers.status();
    config.model.selecting_layers = *std::move(layers);
  }
  absl::StatusOr<std::vector<int32_t>> audited = ParseLayerList(absl::GetFlag(FLAGS_audit_layers));
  if (!audited.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--audit_layers: ", audited.status().message()));
  }
  config.model.audited_layers = *std::move(audited);
  config.model.audit_every = absl::GetFlag(FLAGS_audit_every);
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
  config.stream_threads = absl::GetFlag(FLAGS_stream_threads);
  config.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  config.engine_idle_spin = absl::Microseconds(absl::GetFlag(FLAGS_engine_idle_spin_us));
  config.grpc_memory_bytes = absl::GetFlag(FLAGS_grpc_memory_mib) << 20;
  config.batch_window = absl::Microseconds(absl::GetFlag(FLAGS_batch_window_us));
  config.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  config.batch_max_rows = absl::GetFlag(FLAGS_batch_max_rows);
  config.colocated.max_attachments = absl::GetFlag(FLAGS_colocated_max_attachments);
  config.colocated.max_region_bytes = absl::GetFlag(FLAGS_colocated_max_region_mib) << 20;
  config.snapshot_path = absl::GetFlag(FLAGS_snapshot_path);
  absl::Status valid = config.Validate();
  if (!valid.ok()) return valid;
  return config;
}

}  // namespace blocksel
