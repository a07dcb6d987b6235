// A co-located worker's selection cost, measured on its own stream: the
// worker process attaches to a running server on the same GPU, fills B
// sequences of L tokens over gRPC, checks that the GPU data plane answers
// exactly as the gRPC path does, then times one selection per layer from
// enqueue to ids in the worker's buffer (CUDA events around post and
// await, median of many), the same selections captured in a worker graph,
// and the gRPC round trip of the same batch. The kernel alone comes from
// gpu_selection_bench at the same shape in the same call (RESULTS.md).
// Prints one JSON object.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/gpu_batch_buffers.h"
#include "client/gpu_select_session.h"
#include "client/loadgen/metrics_scrape.h"
#include "colocated/slot_request.h"
#include "kernels/gpu/gpu_selection.h"

ABSL_FLAG(std::string, target, "unix:/tmp/blocksel.sock", "The server, on this GPU");
ABSL_FLAG(int, device, 0, "The worker's GPU");
ABSL_FLAG(int, batch, 1, "Decode requests per selection (B)");
ABSL_FLAG(int64_t, context, 32768, "Tokens each sequence holds (L)");
ABSL_FLAG(int, iterations, 300, "Timed selections per mode");
ABSL_FLAG(int, graph_layers, 4, "Selections one captured worker graph holds");
ABSL_FLAG(std::string, label, "", "Names this worker in the JSON (several run at once)");
ABSL_FLAG(int64_t, start_at, 0,
          "Unix time (seconds) at which the timed part starts, so that several workers time "
          "their selections at once (0: right after the checks)");
ABSL_FLAG(std::string, metrics, "",
          "The server's metrics host:port: the server's own stage means of the timed "
          "selections go into the JSON");

namespace blocksel {
namespace {

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

double Percentile90(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() * 9 / 10];
}

int Fail(const absl::Status& status, const char* what) {
  std::fprintf(stderr, "colocated_bench: %s: %s\n", what, std::string(status.message()).c_str());
  return 1;
}

std::string RandomBf16(std::mt19937_64& random, int64_t count) {
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(count));
  for (float& value : values) value = normal(random);
  return EncodeBf16(values);
}

int Run() {
  const int batch = absl::GetFlag(FLAGS_batch);
  const int64_t context = absl::GetFlag(FLAGS_context);
  const int iterations = absl::GetFlag(FLAGS_iterations);
  BlockselClient client(absl::GetFlag(FLAGS_target));
  absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
  if (!info.ok()) return Fail(info.status(), "GetInfo");
  const v1::ModelConfig& model = info->model();
  const uint32_t layer = model.first_sparse_layer();
  std::mt19937_64 random(static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));

  // B sequences of L tokens, keys appended in pieces below the message limit.
  std::vector<colocated::SlotDecodeRequest> requests;
  constexpr int64_t kAppendTokens = 8192;
  for (int b = 0; b < batch; ++b) {
    absl::StatusOr<uint64_t> id = client.OpenSequence();
    if (!id.ok()) return Fail(id.status(), "OpenSequence");
    for (int64_t start = 0; start < context; start += kAppendTokens) {
      const int64_t tokens = std::min(kAppendTokens, context - start);
      v1::AppendKeysRequest append;
      v1::KeyAppend* keys = append.add_appends();
      keys->set_sequence_id(*id);
      keys->set_first_layer(layer);
      keys->set_start_position(static_cast<uint64_t>(start));
      keys->set_num_tokens(static_cast<uint32_t>(tokens));
      keys->set_keys(RandomBf16(random, tokens * model.head_dim()));
      if (absl::StatusOr<uint64_t> appended = client.AppendKeys(append); !appended.ok()) {
        return Fail(appended.status(), "AppendKeys");
      }
    }
    requests.push_back({*id, static_cast<uint64_t>(context)});
  }

  GpuSessionOptions options;
  options.device = absl::GetFlag(FLAGS_device);
  options.max_requests = static_cast<uint32_t>(batch);
  absl::StatusOr<std::unique_ptr<GpuSelectSession>> session =
      GpuSelectSession::Attach(&client, options);
  if (!session.ok()) return Fail(session.status(), "Attach");
  absl::StatusOr<std::unique_ptr<GpuBatchBuffers>> buffers = GpuBatchBuffers::Create(
      **session, static_cast<int32_t>(model.num_heads()), static_cast<int32_t>(model.topk()));
  if (!buffers.ok()) return Fail(buffers.status(), "buffers");
  void* stream = nullptr;
  void* start = nullptr;
  void* end = nullptr;
  void* rung = nullptr;
  if (gpu::StreamCreate(&stream) != KernelStatus::kOk ||
      gpu::EventCreate(&start) != KernelStatus::kOk ||
      gpu::EventCreate(&rung) != KernelStatus::kOk || gpu::EventCreate(&end) != KernelStatus::kOk) {
    return Fail(absl::InternalError(gpu::LastErrorText()), "stream and events");
  }
  colocated::SlotBatchHeader header;
  header.layer = layer;
  header.num_requests = static_cast<uint32_t>(batch);
  header.tokens_per_request = 1;

  // Both data planes on the same inputs, several times.
  v1::SelectRequest grpc_request;
  grpc_request.set_layer(layer);
  for (const colocated::SlotDecodeRequest& entry : requests) {
    v1::DecodeRequest* decode = grpc_request.mutable_decode()->add_requests();
    decode->set_sequence_id(entry.sequence_id);
    decode->set_seq_len(entry.seq_len);
  }
  int checked = 0;
  for (int check = 0; check < 5; ++check) {
    const std::string queries =
        RandomBf16(random, int64_t{batch} * model.num_heads() * model.head_dim());
    if (absl::Status staged = (*buffers)->Stage(header, requests, queries, "", stream);
        !staged.ok()) {
      return Fail(staged, "Stage");
    }
    if (absl::Status selected = (*session)->Select((*buffers)->selection(), stream);
        !selected.ok()) {
      return Fail(selected, "Select");
    }
    absl::StatusOr<std::vector<int32_t>> ids = (*buffers)->FetchIds(stream);
    if (!ids.ok()) return Fail(ids.status(), "FetchIds");
    if (absl::Status answer = (*session)->LastStatus(); !answer.ok()) {
      return Fail(answer, "the GPU data plane's answer");
    }
    grpc_request.set_queries(queries);
    absl::StatusOr<SelectResult> over_grpc = client.Select(grpc_request);
    if (!over_grpc.ok()) return Fail(over_grpc.status(), "Select over gRPC");
    if (*ids != over_grpc->block_ids) {
      return Fail(absl::InternalError("the block ids differ"), "GPU data plane against gRPC");
    }
    ++checked;
  }

  // Enqueue to ids available, one selection at a time, split at the
  // doorbell: the post (copies and ring) and the wait for the answer (the
  // server's poll, plan and launch, the kernel, the delivery, the copy out).
  if (const int64_t start_at = absl::GetFlag(FLAGS_start_at); start_at > 0) {
    absl::SleepFor(absl::FromUnixSeconds(start_at) - absl::Now());
  }
  const std::string metrics = absl::GetFlag(FLAGS_metrics);
  absl::StatusOr<ServerTimes> before = absl::NotFoundError("no --metrics");
  if (!metrics.empty()) before = ScrapeServerTimes(metrics);
  std::vector<double> direct_us;
  std::vector<double> post_us;
  std::vector<double> answer_us;
  const GpuSelectSession::Selection selection = (*buffers)->selection();
  for (int i = 0; i < iterations; ++i) {
    gpu::EventRecord(start, stream);
    if (absl::Status posted = (*session)->Post(selection, stream); !posted.ok()) {
      return Fail(posted, "Post");
    }
    gpu::EventRecord(rung, stream);
    if (absl::Status awaited = (*session)->Await(selection.block_ids, selection.ids_bytes, stream);
        !awaited.ok()) {
      return Fail(awaited, "Await");
    }
    gpu::EventRecord(end, stream);
    gpu::EventSynchronize(end);
    double whole = 0;
    double post = 0;
    gpu::EventElapsedSeconds(start, end, &whole);
    gpu::EventElapsedSeconds(start, rung, &post);
    direct_us.push_back(whole * 1e6);
    post_us.push_back(post * 1e6);
    answer_us.push_back((whole - post) * 1e6);
  }
  if (absl::Status answer = (*session)->LastStatus(); !answer.ok()) return Fail(answer, "timed");
  // The server's side of the timed selections: mean microseconds per stage.
  std::string server_stages = "null";
  if (before.ok()) {
    absl::StatusOr<ServerTimes> after = ScrapeServerTimes(metrics);
    if (!after.ok()) return Fail(after.status(), "scraping the server");
    std::vector<std::string> means;
    for (const auto& [stage, totals] : after->colocated) {
      const SeriesTotals& earlier = before->colocated[stage];
      const double count = totals.count - earlier.count;
      means.push_back(absl::StrCat(
          "\"", stage, "\": ", count > 0 ? (totals.sum - earlier.sum) / count * 1e6 : 0.0));
    }
    server_stages = absl::StrCat("{", absl::StrJoin(means, ", "), "}");
  }

  // The same selections captured in one worker graph, graph_layers of them
  // in a row as a decode step's layers would be.
  const int layers = absl::GetFlag(FLAGS_graph_layers);
  gpu::CapturedGraph graph;
  if (graph.BeginCapture(stream) != KernelStatus::kOk) {
    return Fail(absl::InternalError(gpu::LastErrorText()), "BeginCapture");
  }
  for (int l = 0; l < layers; ++l) {
    if (absl::Status selected = (*session)->Select((*buffers)->selection(), stream);
        !selected.ok()) {
      return Fail(selected, "Select while capturing");
    }
  }
  if (graph.EndCapture(stream) != KernelStatus::kOk) {
    return Fail(absl::InternalError(gpu::LastErrorText()), "EndCapture");
  }
  std::vector<double> graph_us;
  for (int i = 0; i < iterations; ++i) {
    gpu::EventRecord(start, stream);
    graph.Replay(stream);
    gpu::EventRecord(end, stream);
    gpu::EventSynchronize(end);
    double seconds = 0;
    gpu::EventElapsedSeconds(start, end, &seconds);
    graph_us.push_back(seconds * 1e6 / layers);
  }
  if (absl::Status answer = (*session)->LastStatus(); !answer.ok()) return Fail(answer, "graph");

  // The gRPC round trip of the same batch, as the host sees it.
  std::vector<double> grpc_us;
  for (int i = 0; i < iterations; ++i) {
    const absl::Time sent = absl::Now();
    absl::StatusOr<SelectResult> over_grpc = client.Select(grpc_request);
    if (!over_grpc.ok()) return Fail(over_grpc.status(), "Select over gRPC");
    grpc_us.push_back(absl::ToDoubleMicroseconds(absl::Now() - sent));
  }

  std::printf(
      "{\"label\": \"%s\", \"batch\": %d, \"context\": %lld, \"heads\": %u, \"head_dim\": %u, "
      "\"topk\": %u, \"checked_equal_to_grpc\": %d, \"iterations\": %d, "
      "\"gpu_plane_us\": {\"median\": %.2f, \"p90\": %.2f, \"post_median\": %.2f, "
      "\"answer_median\": %.2f}, "
      "\"gpu_plane_graph_us_per_selection\": {\"median\": %.2f, \"p90\": %.2f, "
      "\"selections_per_graph\": %d}, \"grpc_unary_us\": {\"median\": %.2f, \"p90\": %.2f}, "
      "\"server_stage_means_us\": %s}\n",
      absl::GetFlag(FLAGS_label).c_str(), batch, static_cast<long long>(context), model.num_heads(),
      model.head_dim(), model.topk(), checked, iterations, Median(direct_us),
      Percentile90(direct_us), Median(post_us), Median(answer_us), Median(graph_us),
      Percentile90(graph_us), layers, Median(grpc_us), Percentile90(grpc_us),
      server_stages.c_str());
  for (const colocated::SlotDecodeRequest& entry : requests) {
    client.ReleaseSequence(entry.sequence_id).IgnoreError();
  }
  gpu::EventDestroy(start);
  gpu::EventDestroy(rung);
  gpu::EventDestroy(end);
  gpu::StreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run();
}
