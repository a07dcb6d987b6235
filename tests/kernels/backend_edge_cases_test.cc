// The edge cases every selection backend must get right, as one typed suite
// over every backend and kernel path: the CPU selector always, and on a
// GPU build each GPU path (decode, prefill, prefill with a key split,
// scores then top-k), which skip without a device. Each case is checked
// against the float64 oracle, and exactly where the answer is fixed.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_selector.h"
#include "tests/support/random_batch.h"
#if defined(BLOCKSEL_HAVE_GPU)
#include "tests/support/gpu_runner.h"
#endif

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

struct CpuBackend {
  static constexpr const char* kName = "cpu";
  static bool Available(std::string*) { return true; }
  static bool Runs(const SelectionProblem&) { return true; }
  std::vector<int32_t> Run(const SelectionProblem& problem) {
    std::vector<int32_t> out(
        static_cast<size_t>(problem.shape.num_heads) * problem.total_rows * problem.shape.topk,
        -7);  // poison: every slot must be written
    cpu::CpuSelector selector(2);
    EXPECT_EQ(selector.Select(problem.shape, problem.Batch(out.data())), KernelStatus::kOk);
    return out;
  }
};

#if defined(BLOCKSEL_HAVE_GPU)
template <testing::GpuPath kPath>
struct GpuBackendPath {
  static constexpr const char* kName = kPath == testing::GpuPath::kDecode    ? "gpu_decode"
                                       : kPath == testing::GpuPath::kPrefill ? "gpu_prefill"
                                       : kPath == testing::GpuPath::kPrefillKeySplit
                                           ? "gpu_prefill_key_split"
                                           : "gpu_scores_then_topk";
  static bool Available(std::string* why) {
    *why = "no GPU device: the GPU paths are tested on a machine with one";
    return testing::GpuRunner::HaveDevice();
  }
  static bool Runs(const SelectionProblem& problem) {
    return testing::GpuRunner::Supports(problem, kPath);
  }
  std::vector<int32_t> Run(const SelectionProblem& problem) { return runner.Run(problem, kPath); }
  testing::GpuRunner runner;
};
#endif

using Backends = ::testing::Types<CpuBackend
#if defined(BLOCKSEL_HAVE_GPU)
                                  ,
                                  GpuBackendPath<testing::GpuPath::kDecode>,
                                  GpuBackendPath<testing::GpuPath::kPrefill>,
                                  GpuBackendPath<testing::GpuPath::kPrefillKeySplit>,
                                  GpuBackendPath<testing::GpuPath::kScoresThenTopK>
#endif
                                  >;

struct BackendNames {
  template <typename Backend>
  static std::string GetName(int) {
    return Backend::kName;
  }
};

template <typename Backend>
class BackendEdgeCases : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!Backend::Available(&why)) GTEST_SKIP() << why;
    backend_ = std::make_unique<Backend>();
  }

  // The backend's rows, or nothing when this path does not take the
  // problem (decode takes spans of up to 64 queries).
  bool Run(const SelectionProblem& problem, std::vector<int32_t>* out) {
    if (!Backend::Runs(problem)) return false;
    *out = backend_->Run(problem);
    return true;
  }

  void ExpectOracle(const SelectionProblem& problem) {
    std::vector<int32_t> out;
    if (!Run(problem, &out)) GTEST_SKIP() << Backend::kName << " does not take this batch";
    EXPECT_EQ(CompareWithOracle(problem, out, kTolerance), "");
  }

  std::unique_ptr<Backend> backend_;
};

TYPED_TEST_SUITE(BackendEdgeCases, Backends, BackendNames);

TYPED_TEST(BackendEdgeCases, ShortSequencesGetEveryVisibleBlockThenPadding) {
  // p < 128 * topk: all visible blocks, the rest -1.
  const SelectionProblem problem = ProblemBuilder(M3Shape(), 3, Values::kNormal)
                                       .AddRequest(1, 0, 1)
                                       .AddRequest(129, 128, 1)
                                       .AddRequest(1000, 999, 1)
                                       .Build();
  std::vector<int32_t> out;
  ASSERT_TRUE(this->Run(problem, &out));
  EXPECT_EQ(CompareWithOracle(problem, out, kTolerance), "");
  // Row 0 sees block 0 only; row 1 sees blocks 0..1 with the local block 1 first.
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[1], -1);
  EXPECT_EQ(out[16], 1);
  EXPECT_EQ(out[17], 0);
  EXPECT_EQ(out[18], -1);
}

TYPED_TEST(BackendEdgeCases, PaddingRowsYieldMinusOne) {
  const SelectionProblem problem = ProblemBuilder(M3Shape(), 4, Values::kNormal)
                                       .AddPadding(2)
                                       .AddRequest(700, 698, 2)
                                       .AddPadding(2)
                                       .Build();
  std::vector<int32_t> out;
  ASSERT_TRUE(this->Run(problem, &out));
  EXPECT_EQ(CompareWithOracle(problem, out, kTolerance), "");
  for (int32_t head = 0; head < 4; ++head) {
    for (int32_t row : {0, 1, 4, 5}) {
      for (int32_t k = 0; k < 16; ++k) {
        EXPECT_EQ(out[(head * problem.total_rows + row) * 16 + k], -1);
      }
    }
  }
}

TYPED_TEST(BackendEdgeCases, SpeculativeDecodeWithMixedQ) {
  this->ExpectOracle(ProblemBuilder(M3Shape(), 5, Values::kNormal)
                         .AddRequest(4100, 4096, 4)
                         .AddRequest(900, 899, 1)
                         .AddRequest(130, 128, 2)
                         .Build());
}

TYPED_TEST(BackendEdgeCases, ChunkedPrefillWithAPrefix) {
  this->ExpectOracle(ProblemBuilder(M3Shape(), 15, Values::kNormal)
                         .AddRequest(2300, 2000, 300)  // prefix 2000
                         .AddRequest(300, 0, 300)      // fresh prefill
                         .Build());
}

TYPED_TEST(BackendEdgeCases, NanKeysAndQueriesNeverWin) {
  ProblemBuilder builder(M3Shape(), 6, Values::kNormal);
  builder.AddRequest(2000, 1999, 1).AddRequest(2000, 1999, 1);
  // A NaN in one key of block 3 of the first sequence: that token scores
  // -1e30, its block keeps the max of the other tokens.
  builder.SetKey(0, 3 * 128 + 5, 17, std::nanf(""));
  // A NaN query element: every token scores -1e30 for that head.
  builder.SetQuery(1, 2, 0, std::nanf(""));
  this->ExpectOracle(builder.Build());
}

TYPED_TEST(BackendEdgeCases, Fp8KeysSaturateAt448) {
  ProblemBuilder builder(M3Shape(KeyDtype::kFp8E4m3), 7, Values::kNormal);
  builder.AddRequest(3000, 2999, 1);
  for (int32_t d = 0; d < 128; ++d) builder.SetKey(0, 900, d, 1e6f);  // -> 448
  for (int32_t d = 0; d < 128; ++d) builder.SetKey(0, 2000, d, -1e6f);
  const SelectionProblem problem = builder.Build();
  EXPECT_EQ(problem.key_values[0][900 * 128], 448.0f);
  this->ExpectOracle(problem);
}

TYPED_TEST(BackendEdgeCases, ForcedBlocksBeyondTopk) {
  SelectionShape shape = M3Shape();
  shape.topk = 5;
  shape.init_blocks = 4;
  shape.local_blocks = 3;
  const SelectionProblem problem =
      ProblemBuilder(shape, 8, Values::kNormal).AddRequest(2000, 1999, 1).Build();
  std::vector<int32_t> out;
  ASSERT_TRUE(this->Run(problem, &out));
  EXPECT_EQ(out, problem.Reference());
  // 16 visible blocks: init blocks 0..3 first (1e30), then the lowest of
  // the local blocks 13..15 (1e29).
  EXPECT_EQ(std::vector<int32_t>(out.begin(), out.begin() + 5),
            (std::vector<int32_t>{0, 1, 2, 3, 13}));
}

TYPED_TEST(BackendEdgeCases, TiesGoToTheLowerBlockId) {
  // Small integers: every fp32 sum is exact whatever the order, ties are
  // common, and the answer is the reference's exactly.
  for (uint64_t seed = 1000; seed < 1020; ++seed) {
    const SelectionProblem problem = RandomProblem(seed, Values::kSmallIntegers);
    std::vector<int32_t> out;
    if (this->Run(problem, &out)) {
      EXPECT_EQ(out, problem.Reference()) << "seed " << seed;
    }
  }
}

TYPED_TEST(BackendEdgeCases, EqualScoresGoToTheLowestBlocks) {
  // Zero queries score every block 0: far more candidates tie than a warp
  // ranks at once, so the selection falls back to taking them one by one.
  const SelectionShape shape = M3Shape();
  ProblemBuilder builder(shape, 12, Values::kNormal);
  builder.AddRequest(12000, 11999, 1);
  for (int32_t head = 0; head < shape.num_heads; ++head) {
    for (int32_t element = 0; element < shape.head_dim; ++element) {
      builder.SetQuery(0, head, element, 0.0f);
    }
  }
  const SelectionProblem problem = builder.Build();
  std::vector<int32_t> out;
  ASSERT_TRUE(this->Run(problem, &out));
  EXPECT_EQ(out, problem.Reference());
  // 94 visible blocks: the local block 93, then blocks 0 .. 14.
  std::vector<int32_t> expected = {93};
  for (int32_t block = 0; block < 15; ++block) expected.push_back(block);
  EXPECT_EQ(std::vector<int32_t>(out.begin(), out.begin() + 16), expected);
}

TYPED_TEST(BackendEdgeCases, DecodeOfAThousandBlocks) {
  // 1024 visible blocks: runs of one warp each, then their winners merged.
  this->ExpectOracle(
      ProblemBuilder(M3Shape(), 13, Values::kNormal).AddRequest(131072, 131071, 1).Build());
}

TYPED_TEST(BackendEdgeCases, LastPartialPageOfShuffledPages) {
  // Pages lie in shuffled order with garbage past each sequence's last key;
  // rows end one key into a page, mid-page and one key before its end.
  this->ExpectOracle(ProblemBuilder(M3Shape(), 16, Values::kNormal)
                         .AddRequest(5 * 128 + 1, 5 * 128, 1)
                         .AddRequest(9 * 128 + 64, 9 * 128 + 63, 1)
                         .AddRequest(20 * 128 - 1, 20 * 128 - 2, 1)
                         .Build());
}

TYPED_TEST(BackendEdgeCases, OneLongDecode) {
  this->ExpectOracle(
      ProblemBuilder(M3Shape(), 9, Values::kNormal).AddRequest(200000, 199999, 1).Build());
}

TYPED_TEST(BackendEdgeCases, ManySequencesOfMixedLength) {
  ProblemBuilder mixed(M3Shape(KeyDtype::kFp8E4m3), 10, Values::kNormal);
  for (int i = 0; i < 40; ++i) mixed.AddRequest(1 + i * 397, i * 397, 1);
  this->ExpectOracle(mixed.Build());
}

}  // namespace
}  // namespace blocksel
