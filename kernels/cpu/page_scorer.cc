#include "kernels/cpu/page_scorer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/numeric_formats.h"

namespace blocksel::cpu {
namespace {

constexpr float kNanScore = -1e30f;

void ConvertKeysToFloat(const void* page, KeyDtype dtype, int64_t count, float* out) {
  if (dtype == KeyDtype::kBf16) {
    const auto* src = static_cast<const uint16_t*>(page);
    for (int64_t i = 0; i < count; ++i) out[i] = Bf16ToFloat(src[i]);
  } else {
    const auto* src = static_cast<const uint8_t*>(page);
    for (int64_t i = 0; i < count; ++i) out[i] = Fp8E4m3ToFloat(src[i]);
  }
}

void ScorePagePortable(const PageScoreArgs& args) {
  const int32_t dim = args.head_dim;
  const int32_t max_visible =
      *std::max_element(args.visible_keys, args.visible_keys + args.num_rows);
  if (max_visible <= 0) return;
  PrefetchPageSlice(args.next_page, 0, int64_t{kBlockSize} * dim * KeyDtypeBytes(args.key_dtype));
  ConvertKeysToFloat(args.page, args.key_dtype, static_cast<int64_t>(max_visible) * dim,
                     args.page_scratch);
  for (int32_t row = 0; row < args.num_rows; ++row) {
    const int32_t visible = args.visible_keys[row];
    if (visible <= 0) continue;
    for (int32_t head = 0; head < args.num_heads; ++head) {
      const int64_t query_index = static_cast<int64_t>(row) * args.num_heads + head;
      const float* query = args.queries + query_index * dim;
      float best = -std::numeric_limits<float>::infinity();
      for (int32_t key = 0; key < visible; ++key) {
        const float* key_values = args.page_scratch + key * dim;
        float score = 0.0f;
        for (int32_t d = 0; d < dim; ++d) score += query[d] * key_values[d];
        if (std::isnan(score)) score = kNanScore;
        best = std::max(best, score);
      }
      args.block_max[query_index] = best;
    }
  }
}

void CopyQueries(const float* queries, int64_t count, int32_t head_dim, float* out) {
  std::copy(queries, queries + count * head_dim, out);
}

}  // namespace

const PageScorer& PortablePageScorer() {
  static const PageScorer scorer{"portable", &CopyQueries, &ScorePagePortable};
  return scorer;
}

const PageScorer& BestPageScorer(int32_t head_dim) {
  static const bool has_avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has_avx512 && head_dim % 32 == 0 ? Avx512PageScorer() : PortablePageScorer();
}

}  // namespace blocksel::cpu
