// The golden selection cases of tests/testdata/golden (checked against
// vLLM): parsing, and their expected block ids.
#ifndef BLOCKSEL_TESTS_SUPPORT_GOLDEN_CASE_H_
#define BLOCKSEL_TESTS_SUPPORT_GOLDEN_CASE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/selection_types.h"

namespace blocksel::testing {

struct GoldenRequest {
  int64_t seq_len = 0;     // keys present
  int64_t prefix_len = 0;  // position of the first query row (-1: padding)
  int32_t q_len = 0;
  std::string keys;               // raw little-endian [seq_len][D] of the key dtype
  std::string queries;            // raw bf16 [q_len][H][D]
  std::vector<int32_t> expected;  // [H][q_len][topk]
};

struct GoldenCase {
  std::string name;
  bool decode = false;
  SelectionShape shape;
  std::vector<GoldenRequest> requests;

  int32_t total_rows() const;
  // Expected block ids of the whole batch, [H][total_rows][topk].
  std::vector<int32_t> ExpectedBatch() const;
  // Decode Q (equal for every request of a decode case).
  int32_t tokens_per_request() const;
};

// Every *.json under BLOCKSEL_GOLDEN_DIR, sorted by name.
std::vector<std::string> GoldenFiles();
GoldenCase LoadGoldenCase(const std::string& path);

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_GOLDEN_CASE_H_
