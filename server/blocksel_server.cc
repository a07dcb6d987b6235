#include "server/blocksel_server.h"

#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/server_builder.h"
#include "server/version.h"

namespace blocksel {
namespace {

// The hub of the co-located data plane, on the backend's GPU when it has
// one; otherwise every attach is refused with the reason.
std::unique_ptr<ColocatedHub> CreateColocatedHub(const ServerConfig& config,
                                                 absl::string_view backend, SelectBatcher* batcher,
                                                 ServerMetrics* metrics) {
  std::unique_ptr<RegionDevice> device;
  std::string why_not;
  if (backend == "cpu") {
    why_not =
        "the server runs the cpu backend; the co-located data plane needs a GPU backend "
        "(--backend=cuda or hip): use StreamSelect";
  } else {
    absl::StatusOr<std::unique_ptr<RegionDevice>> created =
        CreateGpuRegionDevice(config.backend.gpu_device);
    if (created.ok()) {
      device = std::move(*created);
    } else {
      why_not = std::string(created.status().message());
    }
  }
  ColocatedOptions options = config.colocated;
  options.on_answered = [metrics](const SelectTimes& times) { metrics->OnColocatedStages(times); };
  return std::make_unique<ColocatedHub>(config.model, batcher, std::move(device),
                                        std::move(why_not), std::move(options));
}

}  // namespace

absl::Status ServerConfig::Validate() const {
  std::vector<std::string> problems;
  absl::Status model_status = model.Validate();
  if (!model_status.ok()) problems.emplace_back(model_status.message());
  if (model_status.ok() && NumPages() < 1) {
    problems.push_back(absl::StrCat("cache of ", cache_bytes, " bytes holds no page of ",
                                    model.PageBytes(), " bytes; raise --cache_mib"));
  }
  if (model_status.ok() && NumPages() > (int64_t{1} << 31) - 1) {
    problems.push_back("cache holds more than 2^31 - 1 pages; lower --cache_mib");
  }
  if (max_sequences < 1) problems.push_back("max_sequences must be >= 1");
  if (default_lease <= absl::ZeroDuration() || default_lease > max_lease) {
    problems.push_back("default lease must be positive and <= the maximum lease");
  }
  if (listen_addresses.empty()) problems.push_back("no listen address");
  if (max_message_bytes < (1 << 20) || max_message_bytes > (int64_t{1} << 31) - 1) {
    problems.push_back("max message size must be in [1 MiB, 2 GiB)");
  }
  if (max_inflight_per_stream < 1) {
    problems.push_back("max inflight per stream must be >= 1");
  }
  if (stream_threads < 1 || stream_threads > 64) {
    problems.push_back("stream threads must be in [1, 64]");
  }
  if (queue_capacity < 1) problems.push_back("queue capacity must be >= 1");
  if (engine_idle_spin < absl::ZeroDuration() || engine_idle_spin > absl::Milliseconds(10)) {
    problems.push_back("engine idle spin must be in [0, 10000] microseconds");
  }
  if (batch_window < absl::ZeroDuration() || batch_window > absl::Milliseconds(100)) {
    problems.push_back("batch window must be in [0, 100000] microseconds");
  }
  if (batch_max_rows < 1) problems.push_back("batch max rows must be >= 1");
  if (colocated.max_attachments < 0) {
    problems.push_back("co-located max attachments must be >= 0");
  }
  if (colocated.max_region_bytes < (int64_t{1} << 20)) {
    problems.push_back("a co-located region must be allowed at least 1 MiB");
  }
  if (grpc_memory_bytes < 4 * max_message_bytes) {
    problems.push_back("gRPC memory must hold at least 4 messages of the maximum size");
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(problems, "; "));
}

absl::StatusOr<std::unique_ptr<BlockselServer>> BlockselServer::Start(const ServerConfig& config) {
  absl::Status valid = config.Validate();
  if (!valid.ok()) return valid;
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      CreateBackend(config.backend, config.model, config.NumPages());
  if (!backend.ok()) return backend.status();

  const std::string backend_name((*backend)->name());
  std::unique_ptr<BlockselServer> server(new BlockselServer());
  server->backend_description_ = absl::StrCat((*backend)->name(), " (", (*backend)->detail(), ")");
  const ModelConfig& model = config.model;
  std::set<int32_t> audit_distances;
  for (const int32_t layer : model.audited_layers) {
    audit_distances.insert(layer - model.SelectionSource(layer));
  }
  server->metrics_ = std::make_unique<ServerMetrics>(
      std::map<std::string, std::string>{
          {"version", kBlockselVersion},
          {"backend", std::string((*backend)->name())},
          {"num_layers", absl::StrCat(model.num_layers)},
          {"first_sparse_layer", absl::StrCat(model.first_sparse_layer)},
          {"num_heads", absl::StrCat(model.num_heads)},
          {"head_dim", absl::StrCat(model.head_dim)},
          {"key_dtype", std::string(KeyDtypeName(model.key_dtype))},
          {"topk", absl::StrCat(model.topk)},
          {"init_blocks", absl::StrCat(model.init_blocks)},
          {"local_blocks", absl::StrCat(model.local_blocks)},
          {"cache_pages", absl::StrCat(config.NumPages())},
          {"batch_window_seconds", absl::StrCat(absl::ToDoubleSeconds(config.batch_window))},
          {"selecting_layers",
           model.selecting_layers.empty() ? "all" : absl::StrJoin(model.selecting_layers, ",")},
          {"audited_layers",
           model.audited_layers.empty() ? "none" : absl::StrJoin(model.audited_layers, ",")},
          {"audit_every", absl::StrCat(model.audit_every)}},
      std::vector<int32_t>(audit_distances.begin(), audit_distances.end()));
  if (!config.metrics_address.empty()) {
    absl::Status serving = server->metrics_->Serve(config.metrics_address);
    if (!serving.ok()) return serving;
  }
  EngineOptions engine_options;
  engine_options.model = config.model;
  engine_options.num_pages = config.NumPages();
  engine_options.max_sequences = config.max_sequences;
  engine_options.default_lease = config.default_lease;
  engine_options.max_lease = config.max_lease;
  engine_options.observer = server->metrics_.get();
  server->engine_ = std::make_unique<Engine>(engine_options, std::move(*backend));
  server->engine_->ReportCache();
  server->snapshot_path_ = config.snapshot_path;
  if (!config.snapshot_path.empty()) {
    // Before any call is served: the engine is still single-threaded here.
    server->loaded_snapshot_ = server->engine_->LoadSnapshot(config.snapshot_path);
  }

  Executor::Options executor_options;
  executor_options.queue_capacity = config.queue_capacity;
  Engine* engine = server->engine_.get();
  executor_options.periodic = [engine] { engine->ReleaseExpired(); };
  executor_options.poll = [engine] { return engine->FinishSelections(/*wait=*/false); };
  executor_options.idle_spin = config.engine_idle_spin;
  executor_options.observer = server->metrics_.get();
  server->executor_ = std::make_unique<Executor>(std::move(executor_options));

  ServiceOptions service_options;
  service_options.max_inflight_per_stream = config.max_inflight_per_stream;
  service_options.stream_threads = config.stream_threads;
  service_options.max_message_bytes = config.max_message_bytes;
  service_options.server_version = kBlockselVersion;
  service_options.snapshot_path = config.snapshot_path;
  SelectBatcher::Options batcher_options;
  batcher_options.window = config.batch_window;
  batcher_options.max_group_rows = config.batch_max_rows;
  server->batcher_ =
      std::make_unique<SelectBatcher>(engine, server->executor_.get(), batcher_options);
  server->colocated_ =
      CreateColocatedHub(config, backend_name, server->batcher_.get(), server->metrics_.get());
  server->colocated_->StartPolling();
  server->service_ = std::make_unique<BlockSelectorService>(
      engine, server->executor_.get(), server->batcher_.get(), server->colocated_.get(),
      server->metrics_.get(), service_options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int first_tcp_port = -1;
  for (const std::string& address : config.listen_addresses) {
    if (!absl::StartsWith(address, "unix:") && first_tcp_port == -1) {
      builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &first_tcp_port);
    } else {
      builder.AddListeningPort(address, grpc::InsecureServerCredentials());
    }
  }
  // Bounds gRPC's buffer memory over all calls together: with one write in
  // flight and a capped read-ahead per stream, a flood of streams or slow
  // readers slows down instead of growing the process.
  grpc::ResourceQuota quota("blocksel-server");
  quota.Resize(static_cast<size_t>(config.grpc_memory_bytes));
  builder.SetResourceQuota(quota);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  builder.RegisterService(server->service_.get());
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues;
  for (int i = 0; i < config.stream_threads; ++i) queues.push_back(builder.AddCompletionQueue());
  server->poller_ = std::make_unique<CompletionQueuePoller>(std::move(queues));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || first_tcp_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", absl::StrJoin(config.listen_addresses, ", "),
                     " (address in use, or not an address gRPC accepts)"));
  }
  server->port_ = first_tcp_port < 0 ? 0 : first_tcp_port;
  server->stream_select_.service = server->service_.get();
  server->stream_select_.batcher = server->batcher_.get();
  server->stream_select_.metrics = server->metrics_.get();
  server->stream_select_.max_inflight = config.max_inflight_per_stream;
  for (const auto& queue : server->poller_->queues()) {
    SelectStreamCall::Accept(&server->stream_select_, queue.get());
  }
  server->poller_->Start();
  // Listening starts only once the backend, the cache and the decode graphs
  // exist, so the server is ready as soon as it can be reached: liveness
  // ("") and readiness (the service's name) both answer SERVING.
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kReadinessService, true);
  return server;
}

void BlockselServer::SetReady(bool ready) {
  if (server_ != nullptr)
    server_->GetHealthCheckService()->SetServingStatus(kReadinessService, ready);
}

BlockselServer::~BlockselServer() {
  if (!shut_down_) Shutdown(absl::ZeroDuration()).IgnoreError();
}

absl::StatusOr<SnapshotSummary> BlockselServer::Shutdown(absl::Duration grace) {
  if (server_ == nullptr || shut_down_) {
    return absl::FailedPreconditionError("the server is already shut down");
  }
  shut_down_ = true;
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  // The server has cancelled what was still open; the completion queues
  // keep being served until every StreamSelect call has ended (one may
  // still start an operation, which a shut-down queue would refuse by
  // aborting), then they are shut down and drained. Then no reactor can
  // queue more work, and once the executor has stopped the engine is
  // single-threaded again.
  // (The wait is bounded, so that a call that never ends cannot hang the
  // shutdown; the server cancelled every call, so none should remain.)
  SelectStreamCall::AwaitNoCalls(stream_select_, grace + absl::Seconds(10));
  poller_->Stop();
  // Co-located workers see their regions closed; slots still in the engine
  // are answered as the executor drains.
  colocated_->Shutdown();
  executor_->Stop();
  if (snapshot_path_.empty()) return absl::NotFoundError("no --snapshot_path");
  return engine_->WriteSnapshot(snapshot_path_);
}

}  // namespace blocksel
