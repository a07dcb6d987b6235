// The CPU backend against the float64 oracle on fresh random problems
// (the edge cases every backend shares: backend_edge_cases_test.cc).
#include "kernels/cpu/cpu_selector.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/page_scorer.h"
#include "kernels/numeric_formats.h"
#include "tests/support/random_batch.h"

namespace blocksel {
namespace {

using testing::CompareWithOracle;
using testing::M3Shape;
using testing::ProblemBuilder;
using testing::RandomProblem;
using testing::SelectionProblem;
using testing::Values;

// fp32 rounding of 128-term sums of N(0,1) products stays far below this.
constexpr double kTolerance = 1e-2;

std::vector<int32_t> RunCpu(const SelectionProblem& problem, int threads) {
  std::vector<int32_t> out(
      static_cast<size_t>(problem.shape.num_heads) * problem.total_rows * problem.shape.topk,
      -7);  // poison: every slot must be written
  cpu::CpuSelector selector(threads);
  EXPECT_EQ(selector.Select(problem.shape, problem.Batch(out.data())), KernelStatus::kOk);
  return out;
}

TEST(CpuSelector, MatchesOracleOnRandomBatches) {
  for (uint64_t seed = 1; seed <= 120; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kNormal);
    const std::string mismatch = CompareWithOracle(problem, RunCpu(problem, 2), kTolerance);
    ASSERT_EQ(mismatch, "") << "seed " << seed;
  }
}

TEST(CpuSelector, MatchesOracleExactlyIncludingTieOrder) {
  // Small integers make every fp32 sum exact and ties common, so the order
  // among equal scores (ascending block id) is checked exactly.
  for (uint64_t seed = 1000; seed < 1080; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kSmallIntegers);
    ASSERT_EQ(RunCpu(problem, 2), problem.Reference()) << "seed " << seed;
  }
}

TEST(CpuSelector, ThreadCountDoesNotChangeResults) {
  for (uint64_t seed = 50; seed < 60; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kNormal);
    EXPECT_EQ(RunCpu(problem, 1), RunCpu(problem, 3)) << "seed " << seed;
  }
}

TEST(CpuSelector, LongDecodeSplitsOneRequestAcrossThreads) {
  const SelectionProblem problem =
      ProblemBuilder(M3Shape(), 9, Values::kNormal).AddRequest(40000, 39999, 1).Build();
  EXPECT_EQ(CompareWithOracle(problem, RunCpu(problem, 4), kTolerance), "");
}

TEST(CpuSelector, RejectsPagesOutsideThePool) {
  SelectionProblem problem =
      ProblemBuilder(M3Shape(), 10, Values::kNormal).AddRequest(300, 299, 1).Build();
  problem.block_tables[0][1] = static_cast<int32_t>(problem.num_pages);
  std::vector<int32_t> out(4 * 16);
  cpu::CpuSelector selector(1);
  EXPECT_EQ(selector.Select(problem.shape, problem.Batch(out.data())),
            KernelStatus::kInvalidArgument);
}

TEST(CpuSelector, RejectsUnsupportedShapes) {
  const SelectionProblem problem =
      ProblemBuilder(M3Shape(), 11, Values::kNormal).AddRequest(10, 9, 1).Build();
  std::vector<int32_t> out(4 * 16);
  cpu::CpuSelector selector(1);
  SelectionShape bad = problem.shape;
  bad.head_dim = 24;
  EXPECT_EQ(selector.Select(bad, problem.Batch(out.data())), KernelStatus::kInvalidArgument);
  bad = problem.shape;
  bad.topk = 0;
  EXPECT_EQ(selector.Select(bad, problem.Batch(out.data())), KernelStatus::kInvalidArgument);
  SelectionBatch batch = problem.Batch(out.data());
  batch.total_rows = 0;  // the span's rows fall outside the batch
  EXPECT_EQ(selector.Select(problem.shape, batch), KernelStatus::kInvalidArgument);
}

// Both page scorers against float64 block maxima, for every visible-key
// count, including partial pages whose tail holds NaN garbage.
TEST(PageScorers, AgreeWithFloat64BlockMaxima) {
  std::mt19937_64 random(12);
  std::normal_distribution<float> normal;
  for (KeyDtype dtype : {KeyDtype::kBf16, KeyDtype::kFp8E4m3}) {
    const int32_t dim = 64;
    const int32_t rows = 5;
    const int32_t heads = 3;
    std::vector<uint8_t> page(kBlockSize * dim * KeyDtypeBytes(dtype));
    std::vector<float> key_values(kBlockSize * dim);
    for (int32_t i = 0; i < kBlockSize * dim; ++i) {
      if (dtype == KeyDtype::kBf16) {
        const uint16_t bits = FloatToBf16(normal(random));
        std::memcpy(page.data() + 2 * i, &bits, 2);
        key_values[i] = Bf16ToFloat(bits);
      } else {
        page[i] = FloatToFp8E4m3(normal(random));
        key_values[i] = Fp8E4m3ToFloat(page[i]);
      }
    }
    std::vector<float> queries(rows * heads * dim);
    for (float& q : queries) q = Bf16ToFloat(FloatToBf16(normal(random)));
    const int32_t visible[rows] = {1, 16, 17, 100, 128};
    // Token 1 holds NaN: beyond row 0's single visible key it must not
    // count; for the other rows it scores -1e30 and loses to its neighbours.
    for (int32_t i = 1 * dim; i < 2 * dim; ++i) {
      if (dtype == KeyDtype::kBf16) {
        const uint16_t nan_bits = 0x7FC0;
        std::memcpy(page.data() + 2 * i, &nan_bits, 2);
      } else {
        page[i] = 0x7F;
      }
      key_values[i] = std::nanf("");
    }
    std::vector<const cpu::PageScorer*> scorers = {&cpu::PortablePageScorer()};
    if (__builtin_cpu_supports("avx512f")) scorers.push_back(&cpu::Avx512PageScorer());
    for (const cpu::PageScorer* scorer : scorers) {
      SCOPED_TRACE(scorer->name);
      std::vector<float> prepared(queries.size());
      scorer->prepare_queries(queries.data(), rows * heads, dim, prepared.data());
      std::vector<float> scratch(cpu::PageScratchFloats(dim, rows * heads));
      std::vector<float> maxima(rows * heads, -7.0f);
      cpu::PageScoreArgs args;
      args.page = page.data();
      args.key_dtype = dtype;
      args.head_dim = dim;
      args.queries = prepared.data();
      args.num_rows = rows;
      args.num_heads = heads;
      args.visible_keys = visible;
      args.page_scratch = scratch.data();
      args.block_max = maxima.data();
      scorer->score_page(args);
      for (int32_t r = 0; r < rows; ++r) {
        for (int32_t h = 0; h < heads; ++h) {
          double best = -INFINITY;
          for (int32_t j = 0; j < visible[r]; ++j) {
            double s = 0;
            for (int32_t d = 0; d < dim; ++d) {
              s +=
                  static_cast<double>(queries[(r * heads + h) * dim + d]) * key_values[j * dim + d];
            }
            best = std::max(best, std::isnan(s) ? -1e30 : s);
          }
          EXPECT_NEAR(maxima[r * heads + h], best, 1e-4 * (1 + std::fabs(best)))
              << "row " << r << " head " << h;
        }
      }
    }
  }
}

}  // namespace
}  // namespace blocksel
