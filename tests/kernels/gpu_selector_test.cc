// The GPU kernels against the CPU backend and the float64 oracle: fresh
// random batches, the decode kernel's own cases, the golden cases (the
// edge cases every backend shares: backend_edge_cases_test.cc). Skips
// without a GPU.
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "client/reference_selection.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_selector.h"
#include "kernels/gpu/gpu_selection.h"
#include "tests/support/golden_case.h"
#include "tests/support/gpu_runner.h"
#include "tests/support/random_batch.h"

namespace blocksel {
namespace {

using testing::CompareWithOracle;
using testing::DeviceBuffer;
using testing::GpuPath;
using testing::GpuRunner;
using testing::M3Shape;
using testing::ProblemBuilder;
using testing::RandomProblem;
using testing::SelectionProblem;
using testing::Values;

constexpr double kTolerance = 1e-2;

class GpuSelectorTest : public ::testing::Test {
 protected:
  using Path = GpuPath;

  void SetUp() override {
    if (!GpuRunner::HaveDevice()) {
      GTEST_SKIP() << "no GPU device: the GPU kernels are tested on a machine with one";
    }
    runner_ = std::make_unique<GpuRunner>();
    device_ = runner_->device();
    stream_ = runner_->stream();
  }

  std::vector<int32_t> Run(const SelectionProblem& problem, Path path,
                           std::vector<float>* scores_out = nullptr,
                           int32_t* max_blocks_out = nullptr) {
    return runner_->Run(problem, path, scores_out, max_blocks_out);
  }

  static std::vector<int32_t> RunCpu(const SelectionProblem& problem) {
    std::vector<int32_t> out(static_cast<size_t>(problem.shape.num_heads) * problem.total_rows *
                             problem.shape.topk);
    cpu::CpuSelector selector(2);
    EXPECT_EQ(selector.Select(problem.shape, problem.Batch(out.data())), KernelStatus::kOk);
    return out;
  }

  static bool FitsDecode(const SelectionProblem& problem) {
    return GpuRunner::Supports(problem, Path::kDecode);
  }

  std::unique_ptr<GpuRunner> runner_;
  gpu::DeviceInfo device_;
  void* stream_ = nullptr;
};

TEST_F(GpuSelectorTest, BothPathsMatchTheOracleOnRandomBatches) {
  for (uint64_t seed = 1; seed <= 120; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kNormal);
    ASSERT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefill), kTolerance), "")
        << "prefill, seed " << seed;
    ASSERT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefillKeySplit), kTolerance), "")
        << "prefill with a key split, seed " << seed;
    ASSERT_EQ(CompareWithOracle(problem, Run(problem, Path::kScoresThenTopK), kTolerance), "")
        << "scores + top-k, seed " << seed;
    if (FitsDecode(problem)) {
      ASSERT_EQ(CompareWithOracle(problem, Run(problem, Path::kDecode), kTolerance), "")
          << "decode, seed " << seed;
    }
  }
}

TEST_F(GpuSelectorTest, BothPathsEqualTheCpuBackendExactlyOnExactInputs) {
  // Small integers: every fp32 sum is exact whatever the order, so the GPU
  // must give the CPU's blocks in the CPU's order, ties included.
  for (uint64_t seed = 1000; seed < 1080; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kSmallIntegers);
    const std::vector<int32_t> cpu = RunCpu(problem);
    ASSERT_EQ(cpu, problem.Reference()) << "seed " << seed;
    ASSERT_EQ(Run(problem, Path::kPrefill), cpu) << "prefill, seed " << seed;
    ASSERT_EQ(Run(problem, Path::kPrefillKeySplit), cpu) << "prefill key split, seed " << seed;
    ASSERT_EQ(Run(problem, Path::kScoresThenTopK), cpu) << "scores + top-k, seed " << seed;
    if (FitsDecode(problem)) {
      ASSERT_EQ(Run(problem, Path::kDecode), cpu) << "decode, seed " << seed;
    }
  }
}

// The score entry point's tensor against float64 block maxima: every
// visible block within rounding, every invisible block exactly -inf.
TEST_F(GpuSelectorTest, BlockScoresMatchFloat64BlockMaxima) {
  for (uint64_t seed = 200; seed < 230; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kNormal);
    std::vector<float> scores;
    int32_t max_blocks = 0;
    Run(problem, Path::kScoresThenTopK, &scores, &max_blocks);
    const SelectionShape& shape = problem.shape;
    for (size_t s = 0; s < problem.spans.size(); ++s) {
      const RowSpan& span = problem.spans[s];
      for (int32_t r = 0; r < span.num_rows; ++r) {
        const int64_t position = int64_t{span.first_position} + r;
        const int32_t row = span.first_row + r;
        for (int32_t head = 0; head < shape.num_heads; ++head) {
          const float* query = problem.query_values.data() +
                               (int64_t{row} * shape.num_heads + head) * shape.head_dim;
          const std::vector<double> expected =
              position < 0 ? std::vector<double>()
                           : ReferenceBlockScores(shape.head_dim, problem.key_values[s].data(),
                                                  position, query);
          for (int32_t block = 0; block < max_blocks; ++block) {
            const float got =
                scores[(int64_t{head} * problem.total_rows + row) * max_blocks + block];
            if (block >= static_cast<int32_t>(expected.size())) {
              ASSERT_EQ(got, -INFINITY) << "seed " << seed << " row " << row << " block " << block;
              continue;
            }
            const double best = expected[block];
            ASSERT_NEAR(got, best, 1e-3 * (1 + std::fabs(best)))
                << "seed " << seed << " row " << row << " block " << block;
          }
        }
      }
    }
  }
}

// Rows longer than one warp's run of candidates, and one longer than a
// whole round of runs (at topk 64 a round takes a few runs of hundreds of
// blocks; this row has 15400 blocks).
TEST_F(GpuSelectorTest, DecodeSelectsRowsOfManyRuns) {
  SelectionShape wide = M3Shape();
  wide.num_heads = 1;
  wide.head_dim = 16;
  wide.topk = 64;
  wide.init_blocks = 2;
  const int64_t round_tokens = int64_t{15} * 1024 * kBlockSize;
  const SelectionProblem problem = ProblemBuilder(wide, 12, Values::kNormal)
                                       .AddRequest(round_tokens + 5000, round_tokens + 4999, 1)
                                       .AddRequest(3000 * kBlockSize, 3000 * kBlockSize - 2, 2)
                                       .Build();
  EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kDecode), kTolerance), "");
  const SelectionProblem ties = ProblemBuilder(wide, 13, Values::kSmallIntegers)
                                    .AddRequest(2500 * kBlockSize, 2500 * kBlockSize - 1, 1)
                                    .Build();
  EXPECT_EQ(Run(ties, Path::kDecode), RunCpu(ties));
}

// Launches on one workspace: each leaves its completion counters at zero,
// so the next (a graph replay, another batch) starts clean.
TEST_F(GpuSelectorTest, DecodeLaunchesShareOneWorkspace) {
  const int64_t bytes = int64_t{64} << 20;
  DeviceBuffer workspace(bytes);
  ASSERT_EQ(gpu::ZeroDevice(workspace.get(), bytes, stream_), KernelStatus::kOk);
  runner_->ReuseWorkspace(workspace.get(), bytes);
  for (uint64_t seed = 300; seed < 330; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kNormal);
    if (!FitsDecode(problem)) continue;
    ASSERT_EQ(CompareWithOracle(problem, Run(problem, Path::kDecode), kTolerance), "")
        << "seed " << seed;
    // The counters: one per span at the workspace's start.
    std::vector<int32_t> counters(problem.spans.size(), -1);
    ASSERT_EQ(gpu::CopyDeviceToHost(counters.data(), workspace.get(),
                                    static_cast<int64_t>(counters.size()) * 4, stream_),
              KernelStatus::kOk);
    ASSERT_EQ(gpu::StreamSynchronize(stream_), KernelStatus::kOk);
    ASSERT_EQ(counters, std::vector<int32_t>(counters.size(), 0)) << "seed " << seed;
  }
}

// A workspace too small for the batch's keys: Select refuses it; the
// decode entry point, which cannot see the batch's lengths on the host,
// answers -1 in every row and touches nothing else (compute-sanitizer's
// memcheck runs this test too).
TEST_F(GpuSelectorTest, DecodeWithATooSmallWorkspaceAnswersMinusOne) {
  const SelectionShape shape = M3Shape();
  const SelectionProblem problem =
      ProblemBuilder(shape, 14, Values::kNormal).AddRequest(50000, 49999, 1).Build();
  const int64_t bytes = 4096;  // the counters, and keys for a few blocks
  gpu::BatchDims dims;
  gpu::AddSpan(shape, 49999, 1, &dims);
  gpu::SelectionPlan plan;
  ASSERT_EQ(gpu::Plan(shape, dims, device_, gpu::PlanOptions{}, &plan), KernelStatus::kOk);
  ASSERT_EQ(plan.path, gpu::KernelPath::kDecode);
  ASSERT_GT(plan.workspace_bytes, bytes);
  gpu::DeviceBatch small;
  small.num_spans = 1;
  small.total_rows = 1;
  small.workspace_bytes = bytes;
  EXPECT_EQ(gpu::Select(plan, small, stream_), KernelStatus::kInvalidArgument);

  DeviceBuffer workspace(bytes);
  ASSERT_EQ(gpu::ZeroDevice(workspace.get(), bytes, stream_), KernelStatus::kOk);
  runner_->ReuseWorkspace(workspace.get(), bytes);
  const std::vector<int32_t> result = Run(problem, Path::kDecodeEntryPoint);
  EXPECT_EQ(result, std::vector<int32_t>(result.size(), -1));
}

TEST_F(GpuSelectorTest, LongPrefillChunkWithPrefix) {
  const SelectionProblem problem = ProblemBuilder(M3Shape(), 11, Values::kNormal)
                                       .AddRequest(6000, 3000, 3000)
                                       .AddRequest(500, 0, 500)
                                       .Build();
  EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefill), kTolerance), "");
  EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefillKeySplit), kTolerance), "");
}

TEST_F(GpuSelectorTest, ReproducesEveryGoldenCase) {
  for (const std::string& file : testing::GoldenFiles()) {
    const testing::GoldenCase golden = testing::LoadGoldenCase(file);
    SCOPED_TRACE(golden.name);
    // Rebuild the case as a problem: raw keys into shuffled pages with
    // garbage tails, raw bf16 queries.
    SelectionProblem problem;
    problem.shape = golden.shape;
    const int64_t token_bytes =
        int64_t{golden.shape.head_dim} * KeyDtypeBytes(golden.shape.key_dtype);
    const int64_t page_bytes = token_bytes * kBlockSize;
    int64_t pages = 0;
    for (const auto& r : golden.requests) pages += (r.seq_len + kBlockSize - 1) / kBlockSize;
    problem.num_pages = pages + 2;
    std::mt19937_64 random(5);
    problem.pool.resize(problem.num_pages * page_bytes);
    for (uint8_t& byte : problem.pool) byte = static_cast<uint8_t>(random());
    std::vector<int32_t> order(problem.num_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), random);
    problem.block_tables.resize(golden.requests.size());
    size_t next_page = 0;
    int32_t row = 0;
    for (size_t i = 0; i < golden.requests.size(); ++i) {
      const auto& r = golden.requests[i];
      for (int64_t token = 0; token < r.seq_len; ++token) {
        if (token % kBlockSize == 0) problem.block_tables[i].push_back(order[next_page++]);
        std::copy_n(r.keys.data() + token * token_bytes, token_bytes,
                    problem.pool.data() + problem.block_tables[i].back() * page_bytes +
                        (token % kBlockSize) * token_bytes);
      }
      RowSpan span;
      span.first_position = static_cast<int32_t>(r.seq_len == 0 ? -r.q_len : r.prefix_len);
      span.num_rows = r.q_len;
      span.first_row = row;
      problem.spans.push_back(span);
      const auto* q = reinterpret_cast<const uint16_t*>(r.queries.data());
      problem.queries.insert(problem.queries.end(), q, q + r.queries.size() / 2);
      row += r.q_len;
    }
    problem.total_rows = row;
    EXPECT_EQ(Run(problem, Path::kPrefill), golden.ExpectedBatch());
    EXPECT_EQ(Run(problem, Path::kPrefillKeySplit), golden.ExpectedBatch());
    if (FitsDecode(problem)) {
      EXPECT_EQ(Run(problem, Path::kDecode), golden.ExpectedBatch());
    }
  }
}

}  // namespace
}  // namespace blocksel
