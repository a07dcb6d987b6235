// A brute-force float64 implementation of SEMANTICS.md, for checking
// selections away from the server: the demo and load generator verify every
// response with it, and the tests use it as their oracle.
#ifndef BLOCKSEL_CLIENT_REFERENCE_SELECTION_H_
#define BLOCKSEL_CLIENT_REFERENCE_SELECTION_H_

#include <cstdint>
#include <vector>

#include "kernels/selection_types.h"

namespace blocksel {

// One request's rows: row i at position first_position + i (negative:
// padding). keys holds at least the visible keys of its sequence as float
// values, token-major [tokens][head_dim].
struct ReferenceRows {
  const float* keys = nullptr;
  int64_t first_position = 0;
  int32_t num_rows = 0;
};

// Returns int32 [num_heads][total_rows][topk] (head-major), rows in request
// order. queries are float values [total_rows][num_heads][head_dim].
std::vector<int32_t> ReferenceSelect(const SelectionShape& shape,
                                     const std::vector<ReferenceRows>& requests,
                                     const float* queries);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_REFERENCE_SELECTION_H_
