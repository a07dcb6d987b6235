// The GPU backend behind the engine, against the CPU backend on the same
// operations: decode steps that carry their keys (graphs, with several
// launches in flight), prefill chunks, appends, releases whose pages are
// reused, tables that outgrow their segments, and a table arena small
// enough to be reset. Keys and queries are small integers, so the fp32
// sums are exact and the two backends must agree to the last block, ties
// included. Skips without a GPU.
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/encoding.h"
#include "gtest/gtest.h"
#include "kernels/gpu/gpu_selection.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/engine.h"
#include "server/engine/gpu_backend.h"

namespace blocksel {
namespace {

constexpr int64_t kPages = 512;
constexpr int32_t kLayer = 1;

ModelConfig TestModel() {
  ModelConfig model;  // M3's index heads, three sparse layers
  model.num_layers = 4;
  model.first_sparse_layer = 1;
  model.max_positions = 1 << 16;
  return model;
}

// Values in [-3, 3]: every q.k of D=128 is an exact fp32 integer.
std::string SmallIntegers(std::mt19937_64& random, int64_t count) {
  std::vector<float> values(count);
  for (float& value : values) value = static_cast<float>(static_cast<int>(random() % 7) - 3);
  return EncodeBf16(values);
}

// A model the kernels cannot run is refused when the backend is created
// (before any device is touched, so this runs without a GPU too), never at
// the first selection.
TEST(GpuBackendCreate, RefusesAModelTheKernelsCannotRun) {
  ModelConfig model = TestModel();
  model.topk = 512;
  absl::StatusOr<std::unique_ptr<GpuBackend>> backend =
      GpuBackend::Create(model, kPages, 0, GpuBackendOptions());
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend.status().message(),
            "the GPU kernels cannot run this model: topk 512 is outside [1, 256]; change the "
            "model config or use --backend=cpu");
}

class GpuEngineTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    if (gpu::DeviceCount() == 0) GTEST_SKIP() << "no GPU on this machine";
    model_ = TestModel();
    EngineOptions options;
    options.model = model_;
    options.num_pages = kPages;
    options.max_sequences = 32;
    absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(model_, kPages, 2);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    GpuBackendOptions gpu_options;
    gpu_options.graph_max_batch = 16;
    gpu_options.table_arena_entries = GetParam();
    absl::StatusOr<std::unique_ptr<GpuBackend>> gpu =
        GpuBackend::Create(model_, kPages, 0, gpu_options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    cpu_ = std::make_unique<Engine>(options, std::move(*cpu));
    gpu_ = std::make_unique<Engine>(options, std::move(*gpu));
  }

  // Applies to both engines; they must agree on the outcome.
  uint64_t Open() {
    absl::StatusOr<v1::OpenSequenceResponse> on_cpu = cpu_->OpenSequence({});
    absl::StatusOr<v1::OpenSequenceResponse> on_gpu = gpu_->OpenSequence({});
    EXPECT_TRUE(on_cpu.ok() && on_gpu.ok());
    EXPECT_EQ(on_cpu->sequence_id(), on_gpu->sequence_id());
    fill_[on_cpu->sequence_id()] = 0;
    return on_cpu->sequence_id();
  }
  void Release(uint64_t id) {
    v1::ReleaseSequenceRequest request;
    request.set_sequence_id(id);
    EXPECT_TRUE(cpu_->ReleaseSequence(request).released());
    EXPECT_TRUE(gpu_->ReleaseSequence(request).released());
    fill_.erase(id);
  }
  void Append(uint64_t id, int64_t tokens) {
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(id);
    append->set_first_layer(kLayer);
    append->set_start_position(static_cast<uint64_t>(fill_[id]));
    append->set_num_tokens(static_cast<uint32_t>(tokens));
    append->set_keys(SmallIntegers(random_, tokens * model_.head_dim));
    ASSERT_TRUE(cpu_->AppendKeys(request).ok());
    ASSERT_TRUE(gpu_->AppendKeys(request).ok());
    fill_[id] += tokens;
  }

  // One decode step of `ids`, each request carrying its Q new tokens' keys,
  // with a padding request at the end when `pad`.
  v1::SelectRequest DecodeStep(const std::vector<uint64_t>& ids, int32_t q, bool pad) {
    v1::SelectRequest request;
    request.set_layer(kLayer);
    request.mutable_decode()->set_tokens_per_request(static_cast<uint32_t>(q));
    for (uint64_t id : ids) {
      v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
      decode->set_sequence_id(id);
      fill_[id] += q;
      decode->set_seq_len(static_cast<uint64_t>(fill_[id]));
      decode->set_keys(SmallIntegers(random_, int64_t{q} * model_.head_dim));
    }
    const int64_t rows = int64_t{q} * (static_cast<int64_t>(ids.size()) + (pad ? 1 : 0));
    if (pad) request.mutable_decode()->add_requests()->set_seq_len(0);
    request.set_queries(SmallIntegers(random_, rows * model_.num_heads * model_.head_dim));
    return request;
  }

  ModelConfig model_;
  std::unique_ptr<Engine> cpu_;
  std::unique_ptr<Engine> gpu_;
  std::mt19937_64 random_{20261201};
  std::map<uint64_t, int64_t> fill_;
};

// Arenas: sized from the page count (never reset), and small enough that
// tables overflow it and it is reset mid-run.
INSTANTIATE_TEST_SUITE_P(Arenas, GpuEngineTest, ::testing::Values(0, 1024));

TEST_P(GpuEngineTest, MatchesTheCpuEngineOnAMixedWorkload) {
  std::vector<uint64_t> live;
  for (int i = 0; i < 6; ++i) {
    live.push_back(Open());
    Append(live.back(), 100 + 700 * i);
  }
  int checked = 0;
  for (int round = 0; round < 40; ++round) {
    // Several decode steps in flight on the GPU before any is finished.
    std::vector<std::unique_ptr<v1::SelectRequest>> requests;
    std::vector<std::unique_ptr<v1::Selection>> on_gpu;
    std::vector<std::unique_ptr<SelectCall>> calls;
    int done = 0;
    for (int step = 0; step < 3; ++step) {
      const int32_t q = 1 + static_cast<int32_t>(random_() % 3);
      std::vector<uint64_t> batch;
      for (uint64_t id : live) {
        if (random_() % 3 != 0) batch.push_back(id);
      }
      if (batch.empty()) batch.push_back(live.front());
      requests.push_back(std::make_unique<v1::SelectRequest>(DecodeStep(batch, q, step == 1)));
      if (step == 2) requests.back()->set_layout(v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
      on_gpu.push_back(std::make_unique<v1::Selection>());
      calls.push_back(std::make_unique<SelectCall>(
          SelectCall{requests.back().get(), on_gpu.back().get(), absl::OkStatus()}));
      gpu_->SelectMany(absl::MakeSpan(calls.back().get(), 1), [&done] { ++done; });
      gpu_->FinishSelections(/*wait=*/false);
    }
    while (gpu_->FinishSelections(/*wait=*/true)) {
    }
    ASSERT_EQ(done, 3);
    for (size_t i = 0; i < requests.size(); ++i) {
      v1::Selection on_cpu;
      ASSERT_TRUE(cpu_->Select(*requests[i], &on_cpu).ok());
      ASSERT_TRUE(calls[i]->status.ok()) << calls[i]->status;
      EXPECT_EQ(on_gpu[i]->block_ids(), on_cpu.block_ids()) << "round " << round << " step " << i;
      ++checked;
    }
    // A prefill chunk of one sequence (direct launches), then churn: a
    // release whose pages the next sequence takes.
    const uint64_t chunked = live[random_() % live.size()];
    Append(chunked, 200);
    v1::SelectRequest prefill;
    prefill.set_layer(kLayer);
    v1::PrefillRequest* chunk = prefill.mutable_prefill()->add_requests();
    chunk->set_sequence_id(chunked);
    chunk->set_prefix_len(static_cast<uint64_t>(fill_[chunked] - 200));
    chunk->set_q_len(200);
    prefill.set_queries(SmallIntegers(random_, int64_t{200} * model_.num_heads * model_.head_dim));
    v1::Selection prefill_cpu, prefill_gpu;
    ASSERT_TRUE(cpu_->Select(prefill, &prefill_cpu).ok());
    ASSERT_TRUE(gpu_->Select(prefill, &prefill_gpu).ok());
    EXPECT_EQ(prefill_gpu.block_ids(), prefill_cpu.block_ids()) << "round " << round;
    if (round % 5 == 4 || fill_[live.front()] > 8000) {
      Release(live.front());
      live.erase(live.begin());
      live.push_back(Open());
      Append(live.back(), 1 + static_cast<int64_t>(random_() % 3000));
    }
  }
  EXPECT_EQ(checked, 120);
}

}  // namespace
}  // namespace blocksel
