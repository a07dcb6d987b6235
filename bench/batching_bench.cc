// Cross-stream batching: throughput and latency of decode selections sent by
// several independent clients (one channel and one StreamSelect each, in a
// closed loop over the sparse layers), against an in-process server with
// batching off and with each window given.
//
// Example: batching_bench --backend=cpu --streams=16 --context=1024
//          --window_us=0,50,200 --seconds=3
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "server/blocksel_server.h"

ABSL_FLAG(std::string, backend, "auto", "Server backend: auto, cpu, cuda, hip");
ABSL_FLAG(int, streams, 16, "Concurrent clients, each with its own channel and stream");
ABSL_FLAG(int64_t, context, 1024, "Tokens of each client's sequence");
ABSL_FLAG(std::string, window_us, "0,50,200", "Batch windows to compare; 0 is batching off");
ABSL_FLAG(double, seconds, 3, "Measured time per window");
ABSL_FLAG(int, cpu_threads, 0, "CPU backend threads (0: one per core)");

namespace blocksel {
namespace {

constexpr int32_t kNumLayers = 4;  // layers 1..3 sparse
constexpr int32_t kFirstSparseLayer = 1;

ModelConfig BenchModel() {
  ModelConfig model;  // M3's index heads: H=4, D=128, topk 16
  model.num_layers = kNumLayers;
  model.first_sparse_layer = kFirstSparseLayer;
  model.num_heads = 4;
  model.head_dim = 128;
  model.key_dtype = KeyDtype::kBf16;
  model.topk = 16;
  model.init_blocks = 0;
  model.local_blocks = 1;
  model.max_positions = int64_t{1} << 20;
  return model;
}

std::string RandomBf16Bytes(std::mt19937_64& random, int64_t count) {
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (float& value : values) value = normal(random);
  return EncodeBf16(values);
}

struct RunResult {
  double requests_per_second = 0;
  double p50_us = 0;
  double p99_us = 0;
  double requests_per_launch = 0;
};

double Percentile(std::vector<double>* values, double fraction) {
  if (values->empty()) return 0;
  const size_t index = static_cast<size_t>(fraction * static_cast<double>(values->size() - 1));
  std::nth_element(values->begin(), values->begin() + index, values->end());
  return (*values)[index];
}

absl::StatusOr<RunResult> Measure(absl::Duration window) {
  const ModelConfig model = BenchModel();
  const int streams = absl::GetFlag(FLAGS_streams);
  const int64_t context = absl::GetFlag(FLAGS_context);
  ServerConfig config;
  config.model = model;
  config.backend.kind = absl::GetFlag(FLAGS_backend);
  config.backend.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  config.cache_bytes = (context / kBlockSize + 2) * streams * model.PageBytes();
  config.listen_addresses = {"127.0.0.1:0"};
  config.metrics_address = "";  // metrics recorded, not served
  config.batch_window = window;
  absl::StatusOr<std::unique_ptr<BlockselServer>> server = BlockselServer::Start(config);
  if (!server.ok()) return server.status();
  const std::string target = absl::StrCat("127.0.0.1:", (*server)->port());

  // One client per stream, each with its own sequence holding `context`
  // keys in every sparse layer.
  std::mt19937_64 random(2026);
  std::vector<std::unique_ptr<BlockselClient>> clients;
  std::vector<uint64_t> sequences;
  const int32_t sparse_layers = kNumLayers - kFirstSparseLayer;
  for (int i = 0; i < streams; ++i) {
    clients.push_back(std::make_unique<BlockselClient>(target, ClientOptions{}));
    absl::StatusOr<uint64_t> id = clients.back()->OpenSequence();
    if (!id.ok()) return id.status();
    sequences.push_back(*id);
    v1::AppendKeysRequest append;
    v1::KeyAppend* keys = append.add_appends();
    keys->set_sequence_id(*id);
    keys->set_first_layer(kFirstSparseLayer);
    keys->set_num_layers(sparse_layers);
    keys->set_num_tokens(static_cast<uint32_t>(context));
    keys->set_keys(RandomBf16Bytes(random, sparse_layers * context * model.head_dim));
    absl::StatusOr<uint64_t> appended = clients.back()->AppendKeys(append);
    if (!appended.ok()) return appended.status();
  }
  const std::string queries = RandomBf16Bytes(random, int64_t{model.num_heads} * model.head_dim);

  std::atomic<bool> measuring{false};
  std::atomic<bool> stop{false};
  std::vector<std::vector<double>> latencies(streams);
  std::vector<absl::Status> failures(streams);
  std::vector<std::thread> threads;
  for (int i = 0; i < streams; ++i) {
    threads.emplace_back([&, i] {
      absl::StatusOr<std::unique_ptr<SelectSession>> session = clients[i]->StartSelectSession();
      if (!session.ok()) {
        failures[i] = session.status();
        return;
      }
      v1::SelectRequest request;
      v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
      decode->set_sequence_id(sequences[i]);
      decode->set_seq_len(static_cast<uint64_t>(context));
      request.set_queries(queries);
      for (uint64_t step = 0; !stop.load(); ++step) {
        request.set_request_id(step);
        request.set_layer(kFirstSparseLayer + static_cast<uint32_t>(step % sparse_layers));
        const absl::Time start = absl::Now();
        absl::StatusOr<SelectResult> result = (*session)->Call(request);
        if (!result.ok()) {
          failures[i] = result.status();
          return;
        }
        if (measuring.load()) {
          latencies[i].push_back(absl::ToDoubleMicroseconds(absl::Now() - start));
        }
      }
      failures[i] = (*session)->Close();
    });
  }
  absl::SleepFor(absl::Milliseconds(300));  // warm-up
  const int64_t launches_before = (*server)->select_launches();
  measuring = true;
  const absl::Time start = absl::Now();
  absl::SleepFor(absl::Seconds(absl::GetFlag(FLAGS_seconds)));
  measuring = false;
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
  const int64_t launches = (*server)->select_launches() - launches_before;
  stop = true;
  for (std::thread& thread : threads) thread.join();
  for (const absl::Status& failure : failures) {
    if (!failure.ok()) return failure;
  }

  std::vector<double> all;
  for (const std::vector<double>& per_stream : latencies) {
    all.insert(all.end(), per_stream.begin(), per_stream.end());
  }
  RunResult result;
  result.requests_per_second = static_cast<double>(all.size()) / elapsed;
  result.requests_per_launch =
      launches > 0 ? static_cast<double>(all.size()) / static_cast<double>(launches) : 0;
  result.p50_us = Percentile(&all, 0.5);
  result.p99_us = Percentile(&all, 0.99);
  std::printf("backend %s\n", (*server)->backend_description().c_str());
  (*server)->Shutdown(absl::ZeroDuration()).IgnoreError();
  return result;
}

int Run() {
  std::vector<int64_t> windows;
  for (absl::string_view text : absl::StrSplit(absl::GetFlag(FLAGS_window_us), ',')) {
    int64_t window = 0;
    if (!absl::SimpleAtoi(text, &window) || window < 0) {
      std::fprintf(stderr, "bad --window_us entry '%s'\n", std::string(text).c_str());
      return 2;
    }
    windows.push_back(window);
  }
  std::printf("decode, H=4 D=128 topk=16 bf16, %d clients, context %lld tokens, B=1 Q=1\n",
              absl::GetFlag(FLAGS_streams), static_cast<long long>(absl::GetFlag(FLAGS_context)));
  std::vector<RunResult> results;
  for (int64_t window : windows) {
    absl::StatusOr<RunResult> result = Measure(absl::Microseconds(window));
    if (!result.ok()) {
      std::fprintf(stderr, "window %lld us: %s\n", static_cast<long long>(window),
                   result.status().ToString().c_str());
      return 1;
    }
    results.push_back(*result);
  }
  std::printf("| window | requests/s | vs first row | requests per launch | p50 | p99 |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (size_t i = 0; i < windows.size(); ++i) {
    const RunResult& r = results[i];
    std::printf("| %s | %.0f | %.2fx | %.1f | %.0f us | %.0f us |\n",
                windows[i] == 0 ? "off" : absl::StrCat(windows[i], " us").c_str(),
                r.requests_per_second, r.requests_per_second / results[0].requests_per_second,
                r.requests_per_launch, r.p50_us, r.p99_us);
  }
  return 0;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run();
}
