// The GPU kernels against the CPU backend and the float64 oracle: fresh
// random batches, every edge case, the golden cases. Skips without a GPU.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "client/reference_selection.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_selector.h"
#include "kernels/gpu/gpu_selection.h"
#include "tests/support/golden_case.h"
#include "tests/support/random_batch.h"

namespace blocksel {
namespace {

using testing::CompareWithOracle;
using testing::M3Shape;
using testing::ProblemBuilder;
using testing::RandomProblem;
using testing::SelectionProblem;
using testing::Values;

constexpr double kTolerance = 1e-2;

// A device buffer freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t bytes) {
    EXPECT_EQ(gpu::DeviceAlloc(&data_, std::max<int64_t>(bytes, 16)), KernelStatus::kOk);
  }
  ~DeviceBuffer() { gpu::DeviceFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

class GpuSelectorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu::DeviceCount() == 0) {
      GTEST_SKIP() << "no GPU device: the GPU kernels are tested on a machine with one";
    }
    ASSERT_EQ(gpu::QueryDevice(0, &device_), KernelStatus::kOk);
    ASSERT_EQ(gpu::StreamCreate(&stream_), KernelStatus::kOk);
  }
  void TearDown() override { gpu::StreamDestroy(stream_); }

  // kScoresThenTopK: vLLM's score entry point, then top-k from scores.
  // kPrefillKeySplit: the prefill kernel with each tile's keys split over
  // kTestKeySplits CTAs and merged (more splits than short rows have
  // blocks, so some CTAs get none).
  // kDecodeEntryPoint: LaunchDecode called directly, as in-process callers
  // do, with no plan checking the workspace.
  enum class Path { kDecode, kPrefill, kPrefillKeySplit, kScoresThenTopK, kDecodeEntryPoint };
  static constexpr int32_t kTestKeySplits = 5;

  // Uploads the problem, runs one kernel path, returns [H][rows][topk].
  // With scores_out, the score path also returns its [H][rows][max_blocks]
  // tensor and *max_blocks.
  std::vector<int32_t> Run(const SelectionProblem& problem, Path path,
                           std::vector<float>* scores_out = nullptr,
                           int32_t* max_blocks_out = nullptr) {
    std::vector<gpu::DeviceSpan> spans;
    std::vector<int32_t> table;
    gpu::BatchDims dims;
    for (size_t i = 0; i < problem.spans.size(); ++i) {
      const RowSpan& span = problem.spans[i];
      gpu::AddSpan(problem.shape, span.first_position, span.num_rows, &dims);
      spans.push_back(
          {span.first_position, span.num_rows, span.first_row, static_cast<int32_t>(table.size())});
      table.insert(table.end(), problem.block_tables[i].begin(), problem.block_tables[i].end());
    }
    const SelectionShape& shape = problem.shape;
    const int32_t max_rows = dims.max_rows_per_span;
    const int64_t out_count = int64_t{shape.num_heads} * problem.total_rows * shape.topk;
    // The kernel paths run through the plan, pinned to the path under test.
    gpu::PlanOptions options;
    options.force_path = true;
    const bool decode = path == Path::kDecode || path == Path::kDecodeEntryPoint;
    options.path = decode ? gpu::KernelPath::kDecode : gpu::KernelPath::kPrefill;
    options.splits = path == Path::kPrefill ? 1 : path == Path::kPrefillKeySplit ? kTestKeySplits : 0;
    gpu::SelectionPlan plan;
    if (path != Path::kScoresThenTopK) {
      EXPECT_EQ(gpu::Plan(shape, dims, device_, options, &plan), KernelStatus::kOk);
    }
    DeviceBuffer pool(static_cast<int64_t>(problem.pool.size()));
    DeviceBuffer table_device(static_cast<int64_t>(table.size()) * 4);
    DeviceBuffer spans_device(static_cast<int64_t>(spans.size() * sizeof(gpu::DeviceSpan)));
    DeviceBuffer queries(static_cast<int64_t>(problem.queries.size()) * 2);
    DeviceBuffer out(out_count * 4);
    const int64_t workspace_bytes = plan.workspace_bytes;
    DeviceBuffer fresh_workspace(reused_workspace_ == nullptr ? workspace_bytes : 0);
    if (reused_workspace_ == nullptr) {
      EXPECT_EQ(gpu::ZeroDevice(fresh_workspace.get(), workspace_bytes, stream_),
                KernelStatus::kOk);
    }
    EXPECT_EQ(gpu::CopyHostToDevice(pool.get(), problem.pool.data(),
                                    static_cast<int64_t>(problem.pool.size()), stream_),
              KernelStatus::kOk);
    EXPECT_EQ(gpu::CopyHostToDevice(table_device.get(), table.data(),
                                    static_cast<int64_t>(table.size()) * 4, stream_),
              KernelStatus::kOk);
    EXPECT_EQ(gpu::CopyHostToDevice(spans_device.get(), spans.data(),
                                    static_cast<int64_t>(spans.size() * sizeof(gpu::DeviceSpan)),
                                    stream_),
              KernelStatus::kOk);
    EXPECT_EQ(gpu::CopyHostToDevice(queries.get(), problem.queries.data(),
                                    static_cast<int64_t>(problem.queries.size()) * 2, stream_),
              KernelStatus::kOk);
    // Poison: every slot must be written.
    std::vector<int32_t> result(out_count, -7);
    EXPECT_EQ(gpu::CopyHostToDevice(out.get(), result.data(), out_count * 4, stream_),
              KernelStatus::kOk);
    gpu::DeviceBatch batch;
    batch.key_pool = pool.get();
    batch.num_pages = problem.num_pages;
    batch.block_table = static_cast<const int32_t*>(table_device.get());
    batch.spans = static_cast<const gpu::DeviceSpan*>(spans_device.get());
    batch.num_spans = static_cast<int32_t>(spans.size());
    batch.queries = static_cast<const uint16_t*>(queries.get());
    batch.total_rows = problem.total_rows;
    batch.block_ids = static_cast<int32_t*>(out.get());
    batch.workspace = reused_workspace_ != nullptr ? reused_workspace_ : fresh_workspace.get();
    batch.workspace_bytes =
        reused_workspace_ != nullptr ? reused_workspace_bytes_ : workspace_bytes;
    // Score path: positions of every row, the visible blocks of the longest.
    std::vector<int32_t> positions(problem.total_rows);
    int32_t max_blocks = 1;
    for (const RowSpan& span : problem.spans) {
      for (int32_t r = 0; r < span.num_rows; ++r) {
        positions[span.first_row + r] = span.first_position + r;
        max_blocks = std::max(max_blocks, VisibleBlocks(span.first_position + r));
      }
    }
    const int64_t score_count = out_count / shape.topk * max_blocks;
    DeviceBuffer scores(path == Path::kScoresThenTopK ? score_count * 4 : 16);
    DeviceBuffer positions_device(static_cast<int64_t>(positions.size()) * 4);
    EXPECT_EQ(gpu::CopyHostToDevice(positions_device.get(), positions.data(),
                                    static_cast<int64_t>(positions.size()) * 4, stream_),
              KernelStatus::kOk);
    KernelStatus launched = KernelStatus::kOk;
    switch (path) {
      case Path::kDecode:
      case Path::kPrefill:
      case Path::kPrefillKeySplit:
        launched = gpu::Select(plan, batch, stream_);
        break;
      case Path::kDecodeEntryPoint:
        launched = gpu::LaunchDecode(shape, batch, max_rows, gpu::DecodeSplits(device_), stream_);
        break;
      case Path::kScoresThenTopK:
        launched = gpu::LaunchBlockScores(shape, batch, max_rows, static_cast<float*>(scores.get()),
                                          max_blocks, stream_);
        if (launched == KernelStatus::kOk) {
          launched = gpu::LaunchTopKFromScores(
              shape, static_cast<const float*>(scores.get()), max_blocks,
              static_cast<const int32_t*>(positions_device.get()), problem.total_rows,
              static_cast<int32_t*>(out.get()), stream_);
        }
        break;
    }
    EXPECT_EQ(launched, KernelStatus::kOk) << gpu::LastErrorText();
    if (scores_out != nullptr && path == Path::kScoresThenTopK) {
      scores_out->resize(score_count);
      EXPECT_EQ(gpu::CopyDeviceToHost(scores_out->data(), scores.get(), score_count * 4, stream_),
                KernelStatus::kOk);
      *max_blocks_out = max_blocks;
    }
    EXPECT_EQ(gpu::CopyDeviceToHost(result.data(), out.get(), out_count * 4, stream_),
              KernelStatus::kOk);
    EXPECT_EQ(gpu::StreamSynchronize(stream_), KernelStatus::kOk) << gpu::LastErrorText();
    return result;
  }

  static std::vector<int32_t> RunCpu(const SelectionProblem& problem) {
    std::vector<int32_t> out(static_cast<size_t>(problem.shape.num_heads) * problem.total_rows *
                             problem.shape.topk);
    cpu::CpuSelector selector(2);
    EXPECT_EQ(selector.Select(problem.shape, problem.Batch(out.data())), KernelStatus::kOk);
    return out;
  }

  static bool FitsDecode(const SelectionProblem& problem) {
    for (const RowSpan& span : problem.spans) {
      if (span.num_rows * problem.shape.num_heads > gpu::kKernelLimits.max_decode_queries)
        return false;
    }
    return true;
  }

  gpu::DeviceInfo device_;
  void* stream_ = nullptr;
  // When set, Run uses this workspace as it is instead of a fresh one.
  void* reused_workspace_ = nullptr;
  int64_t reused_workspace_bytes_ = 0;
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

TEST_F(GpuSelectorTest, EdgeCases) {
  SelectionShape forced = M3Shape();
  forced.topk = 5;
  forced.init_blocks = 4;
  forced.local_blocks = 3;
  ProblemBuilder nan_builder(M3Shape(), 6, Values::kNormal);
  nan_builder.AddRequest(2000, 1999, 1).AddRequest(2000, 1999, 1);
  nan_builder.SetKey(0, 3 * 128 + 5, 17, std::nanf(""));
  nan_builder.SetQuery(1, 2, 0, std::nanf(""));
  ProblemBuilder saturated(M3Shape(KeyDtype::kFp8E4m3), 7, Values::kNormal);
  saturated.AddRequest(3000, 2999, 1);
  for (int32_t d = 0; d < 128; ++d) saturated.SetKey(0, 900, d, 1e6f);
  std::vector<std::pair<std::string, SelectionProblem>> cases;
  cases.emplace_back("short sequences (p < 128 * topk)",
                     ProblemBuilder(M3Shape(), 3, Values::kNormal)
                         .AddRequest(1, 0, 1)
                         .AddRequest(129, 128, 1)
                         .AddRequest(1000, 999, 1)
                         .Build());
  cases.emplace_back("padding rows", ProblemBuilder(M3Shape(), 4, Values::kNormal)
                                         .AddPadding(2)
                                         .AddRequest(700, 698, 2)
                                         .AddPadding(2)
                                         .Build());
  cases.emplace_back("Q = 4 and mixed Q", ProblemBuilder(M3Shape(), 5, Values::kNormal)
                                              .AddRequest(4100, 4096, 4)
                                              .AddRequest(900, 899, 1)
                                              .AddRequest(130, 128, 2)
                                              .Build());
  cases.emplace_back("NaN key and query", nan_builder.Build());
  cases.emplace_back("fp8 saturation", saturated.Build());
  cases.emplace_back("forced blocks beyond topk",
                     ProblemBuilder(forced, 8, Values::kNormal).AddRequest(2000, 1999, 1).Build());
  cases.emplace_back(
      "one long decode",
      ProblemBuilder(M3Shape(), 9, Values::kNormal).AddRequest(200000, 199999, 1).Build());
  ProblemBuilder mixed(M3Shape(KeyDtype::kFp8E4m3), 10, Values::kNormal);
  for (int i = 0; i < 40; ++i) mixed.AddRequest(1 + i * 397, i * 397, 1);
  cases.emplace_back("many sequences of mixed length", mixed.Build());
  for (const auto& [name, problem] : cases) {
    SCOPED_TRACE(name);
    EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kDecode), kTolerance), "");
    EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefill), kTolerance), "");
    EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kPrefillKeySplit), kTolerance), "");
    EXPECT_EQ(CompareWithOracle(problem, Run(problem, Path::kScoresThenTopK), kTolerance), "");
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
  reused_workspace_ = workspace.get();
  reused_workspace_bytes_ = bytes;
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
  reused_workspace_ = workspace.get();
  reused_workspace_bytes_ = bytes;
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
