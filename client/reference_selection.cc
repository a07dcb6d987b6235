#include "client/reference_selection.h"

#include <algorithm>
#include <cmath>

namespace blocksel {

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
      const int64_t valid = position / kBlockSize + 1;
      for (int32_t head = 0; head < shape.num_heads; ++head) {
        const float* query = queries + (row * shape.num_heads + head) * dim;
        std::vector<std::pair<double, int64_t>> ranked;
        for (int64_t block = 0; block < valid; ++block) {
          double best = -INFINITY;
          const int64_t last = std::min(position, block * kBlockSize + kBlockSize - 1);
          for (int64_t token = block * kBlockSize; token <= last; ++token) {
            double score = 0.0;
            for (int64_t d = 0; d < dim; ++d) {
              score += static_cast<double>(query[d]) * request.keys[token * dim + d];
            }
            if (std::isnan(score)) score = -1e30;
            best = std::max(best, score);
          }
          if (block >= valid - shape.local_blocks) {
            best = 1e29;
          } else if (block < shape.init_blocks) {
            best = 1e30;
          }
          ranked.emplace_back(best, block);
        }
        std::stable_sort(ranked.begin(), ranked.end(),
                         [](const auto& a, const auto& b) { return a.first > b.first; });
        const int64_t keep = std::min<int64_t>(shape.topk, valid);
        int32_t* out_row = out.data() + (head * total_rows + row) * shape.topk;
        for (int64_t k = 0; k < keep; ++k) out_row[k] = static_cast<int32_t>(ranked[k].second);
      }
    }
  }
  return out;
}

}  // namespace blocksel
