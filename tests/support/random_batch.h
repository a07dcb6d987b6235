// Random selection problems for backend tests: a paged key pool with pages
// in shuffled order and garbage in every unused slot, block tables, query
// rows, and the float values the oracle needs.
#ifndef BLOCKSEL_TESTS_SUPPORT_RANDOM_BATCH_H_
#define BLOCKSEL_TESTS_SUPPORT_RANDOM_BATCH_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "client/reference_selection.h"
#include "kernels/selection_types.h"

namespace blocksel::testing {

enum class Values {
  kNormal,         // N(0, 1): realistic, near-ties possible
  kSmallIntegers,  // integers in [-3, 3]: fp32 sums exact, many exact ties
};

// Move-only: spans and reference_rows point into the vectors it owns, which
// a move keeps in place and a copy would not.
struct SelectionProblem {
  SelectionProblem() = default;
  SelectionProblem(SelectionProblem&&) = default;
  SelectionProblem& operator=(SelectionProblem&&) = default;
  SelectionProblem(const SelectionProblem&) = delete;
  SelectionProblem& operator=(const SelectionProblem&) = delete;

  SelectionShape shape;
  std::vector<uint8_t> pool;  // [num_pages][kBlockSize][head_dim] raw keys
  int64_t num_pages = 0;
  std::vector<std::vector<int32_t>> block_tables;  // one per request
  std::vector<std::vector<float>> key_values;      // decoded, token-major
  std::vector<RowSpan> spans;
  std::vector<uint16_t> queries;  // bf16 [rows][H][D]
  std::vector<float> query_values;
  int32_t total_rows = 0;
  std::vector<ReferenceRows> reference_rows;

  // A batch over this problem writing to out ([H][rows][topk]).
  SelectionBatch Batch(int32_t* out) const;
  std::vector<int32_t> Reference() const;
  // Float64 priority of every visible block of (head, row), as the oracle
  // ranks them (forced blocks at 1e30 / 1e29).
  std::vector<double> Priorities(int32_t head, int32_t row) const;
  int64_t PositionOf(int32_t row) const;
};

class ProblemBuilder {
 public:
  ProblemBuilder(const SelectionShape& shape, uint64_t seed, Values values);

  // A request over a sequence of sequence_tokens keys, rows at positions
  // first_position .. first_position + num_rows - 1 (all < sequence_tokens).
  ProblemBuilder& AddRequest(int64_t sequence_tokens, int64_t first_position, int32_t num_rows);
  // A padding request (decode seq_len 0) of num_rows rows.
  ProblemBuilder& AddPadding(int32_t num_rows);
  // Sets key (request, token, element) to a raw value before encoding
  // (NaN, huge values that fp8 saturates, ...).
  ProblemBuilder& SetKey(int request, int64_t token, int32_t element, float value);
  ProblemBuilder& SetQuery(int32_t row, int32_t head, int32_t element, float value);

  SelectionProblem Build();

 private:
  struct Pending {
    int64_t sequence_tokens;
    int64_t first_position;
    int32_t num_rows;
    bool padding;
    std::vector<float> keys;  // raw, before encoding
  };
  float Draw();

  SelectionShape shape_;
  std::mt19937_64 random_;
  Values values_;
  std::vector<Pending> requests_;
  std::vector<float> query_raw_;
};

// MiniMax M3's indexer: H=4, D=128, topk 16, init 0, local 1.
SelectionShape M3Shape(KeyDtype dtype = KeyDtype::kBf16);

// A random shape (H, D in {16..256}, dtype, topk, init/local blocks) and a
// random batch of 1 to 4 requests: either decode (Q in {1, 2, 4}, padding
// requests among them) or prefill chunks with random prefixes.
SelectionProblem RandomProblem(uint64_t seed, Values values);

// Empty if the backend's rows equal the oracle's. Otherwise it accepts rows
// that differ only where the oracle's float64 priorities are within
// tolerance of each other (near-ties, where fp32 rounding may decide), and
// returns a description of the first row that is wrong beyond that.
std::string CompareWithOracle(const SelectionProblem& problem, const std::vector<int32_t>& got,
                              double tolerance);

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_RANDOM_BATCH_H_
