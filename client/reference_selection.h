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

// Block scores of one query at `position` (>= 0) in float64: for each
// visible block b = 0 .. position / 128, the max of q.k over its keys at
// positions <= position, a NaN token score counting as -1e30.
std::vector<double> ReferenceBlockScores(int32_t head_dim, const float* keys, int64_t position,
                                         const float* query);

// Replaces the scores of forced blocks with their priorities (init 1e30,
// local 1e29, local winning where a block is both).
void ApplyForcedPriorities(const SelectionShape& shape, std::vector<double>* block_scores);

// Returns int32 [num_heads][total_rows][topk] (head-major), rows in request
// order. queries are float values [total_rows][num_heads][head_dim].
std::vector<int32_t> ReferenceSelect(const SelectionShape& shape,
                                     const std::vector<ReferenceRows>& requests,
                                     const float* queries);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_REFERENCE_SELECTION_H_
