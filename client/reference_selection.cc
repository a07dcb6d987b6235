#include "client/reference_selection.h"

#include <algorithm>
#include <cmath>

namespace blocksel {

std::vector<double> ReferenceBlockScores(int32_t head_dim, const float* keys, int64_t position,
                                         const float* query) {
  const int64_t valid = position / kBlockSize + 1;
  std::vector<double> scores(valid, -INFINITY);
  for (int64_t token = 0; token <= position; ++token) {
    double score = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) {
      score += static_cast<double>(query[d]) * keys[token * head_dim + d];
    }
    if (std::isnan(score)) score = -1e30;
    double& best = scores[token / kBlockSize];
    best = std::max(best, score);
  }
  return scores;
}

void ApplyForcedPriorities(const SelectionShape& shape, std::vector<double>* block_scores) {
  const int64_t valid = static_cast<int64_t>(block_scores->size());
  for (int64_t block = 0; block < valid; ++block) {
    if (block >= valid - shape.local_blocks) {
      (*block_scores)[block] = 1e29;
    } else if (block < shape.init_blocks) {
      (*block_scores)[block] = 1e30;
    }
  }
}

std::vector<int32_t> ReferenceSelect(const SelectionShape& shape,
                                     const std::vector<ReferenceRows>& requests,
                                     const float* queries) {
  int64_t total_rows = 0;
  for (const ReferenceRows& request : requests) total_rows += request.num_rows;
  const int64_t dim = shape.head_dim;
  std::vector<int32_t> out(static_cast<size_t>(shape.num_heads * total_rows * shape.topk), -1);
  int64_t row = 0;
  for (const ReferenceRows& request : requests) {
    for (int32_t i = 0; i < request.num_rows; ++i, ++row) {
      const int64_t position = request.first_position + i;
      if (position < 0) continue;
      for (int32_t head = 0; head < shape.num_heads; ++head) {
        std::vector<double> priorities = ReferenceBlockScores(
            shape.head_dim, request.keys, position, queries + (row * shape.num_heads + head) * dim);
        ApplyForcedPriorities(shape, &priorities);
        std::vector<int64_t> ranked(priorities.size());
        for (size_t b = 0; b < ranked.size(); ++b) ranked[b] = static_cast<int64_t>(b);
        std::stable_sort(ranked.begin(), ranked.end(),
                         [&](int64_t a, int64_t b) { return priorities[a] > priorities[b]; });
        const int64_t keep = std::min<int64_t>(shape.topk, static_cast<int64_t>(ranked.size()));
        int32_t* out_row = out.data() + (head * total_rows + row) * shape.topk;
        for (int64_t k = 0; k < keep; ++k) out_row[k] = static_cast<int32_t>(ranked[k]);
      }
    }
  }
  return out;
}

}  // namespace blocksel
