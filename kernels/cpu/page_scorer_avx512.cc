// AVX-512F page scorer. This file alone is compiled with -mavx512f; it is only
// entered through BestPageScorer(), after a run-time CPU check, so the rest of
// the binary stays portable. It uses intrinsics and plain loops only, so no
// inline function compiled for AVX-512 can leak into portable callers.
//
// bf16 keys are never widened in memory. A 64-byte load holds 32 bf16 keys
// elements; as 16 32-bit lanes, lane i is (k[2i+1] << 16 | k[2i]), so a left
// shift by 16 gives k[2i] exactly as fp32 and clearing the low half gives
// k[2i+1]. Queries are stored pre-split to match: per 32 elements, the 16
// even ones, then the 16 odd ones. fp8 keys are first converted, exactly, to
// bf16 in a small scratch buffer and then take the same path.
#include <immintrin.h>

#include "kernels/cpu/page_scorer.h"

namespace blocksel::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kPairLanes = 32;  // bf16 elements per 64-byte load

// e4m3fn -> bf16 bit patterns, exactly, in 16-bit lanes (AVX-512BW).
// Normals rebias the exponent (e - 7 + 127): bf16 = (e << 7 | m << 4) +
// (120 << 7). The 8 subnormals m * 2^-9 come from a table, 0x7f is NaN, and
// the sign moves from bit 7 to bit 15.
void ConvertFp8ToBf16(const uint8_t* src, int64_t count, uint16_t* out) {
  alignas(64) static constexpr uint16_t kSubnormals[32] = {0x0000, 0x3B00, 0x3B80, 0x3BC0,
                                                           0x3C00, 0x3C20, 0x3C40, 0x3C60};
  const __m512i subnormals = _mm512_load_si512(kSubnormals);
  const __m512i magnitude_mask = _mm512_set1_epi16(0x7F);
  const __m512i sign_mask = _mm512_set1_epi16(0x80);
  const __m512i rebias = _mm512_set1_epi16(120 << 7);
  const __m512i smallest_normal = _mm512_set1_epi16(0x08);
  const __m512i nan = _mm512_set1_epi16(0x7FC0);
  for (int64_t i = 0; i < count; i += kPairLanes) {
    const __m512i bytes =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m512i magnitude = _mm512_and_si512(bytes, magnitude_mask);
    __m512i value = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), rebias);
    value = _mm512_mask_mov_epi16(value, _mm512_cmplt_epu16_mask(magnitude, smallest_normal),
                                  _mm512_permutexvar_epi16(magnitude, subnormals));
    value = _mm512_mask_mov_epi16(value, _mm512_cmpeq_epi16_mask(magnitude, magnitude_mask), nan);
    value = _mm512_or_si512(value, _mm512_slli_epi16(_mm512_and_si512(bytes, sign_mask), 8));
    _mm512_storeu_si512(out + i, value);
  }
}

// Splits each 32-element chunk into its 16 even and then its 16 odd elements.
void SplitQueries(const float* queries, int64_t count, int32_t head_dim, float* out) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t total = count * head_dim;
  for (int64_t i = 0; i < total; i += kPairLanes) {
    const __m512 low = _mm512_loadu_ps(queries + i);
    const __m512 high = _mm512_loadu_ps(queries + i + kLanes);
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(low, even, high));
    _mm512_storeu_ps(out + i + kLanes, _mm512_permutex2var_ps(low, odd, high));
  }
}

// Reduces 16 accumulators to one vector whose lane j is the sum of the lanes
// of acc[j]. A fixed tree, so the result does not depend on the caller.
__m512 ReduceSixteen(const __m512* acc) {
  __m512 pairs[8];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  }
  __m512 quads[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d lo =
        _mm512_unpacklo_pd(_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
    const __m512d hi =
        _mm512_unpackhi_pd(_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // quads[k], 128-bit lane L, element m: partial sum of acc[4k+m] over lane L.
  const __m512 half0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                     _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 half1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                     _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(half0, half1, 0x88),
                       _mm512_shuffle_f32x4(half0, half1, 0xDD));
}

// Scores of 4 queries against 4 consecutive keys: lane 4k + m of the result
// is query m against key k. keys points at key 0 (bf16, row stride dim).
__m512 ScoreFourByFour(const float* const query[4], const uint16_t* keys, int32_t dim) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int32_t c = 0; c < dim; c += kPairLanes) {
    __m512 even_query[4];
    __m512 odd_query[4];
    for (int m = 0; m < 4; ++m) {
      even_query[m] = _mm512_loadu_ps(query[m] + c);
      odd_query[m] = _mm512_loadu_ps(query[m] + c + kLanes);
    }
    for (int k = 0; k < 4; ++k) {
      const __m512i packed = _mm512_loadu_si512(keys + k * dim + c);
      const __m512 even_key = _mm512_castsi512_ps(_mm512_slli_epi32(packed, 16));
      const __m512 odd_key = _mm512_castsi512_ps(_mm512_and_si512(packed, high_half));
      for (int m = 0; m < 4; ++m) {
        acc[4 * k + m] = _mm512_fmadd_ps(even_query[m], even_key, acc[4 * k + m]);
        acc[4 * k + m] = _mm512_fmadd_ps(odd_query[m], odd_key, acc[4 * k + m]);
      }
    }
  }
  return ReduceSixteen(acc);
}

void ScorePageAvx512(const PageScoreArgs& args) {
  const int32_t dim = args.head_dim;
  const int32_t num_queries = args.num_rows * args.num_heads;
  int32_t max_visible = 0;
  for (int32_t row = 0; row < args.num_rows; ++row) {
    max_visible = args.visible_keys[row] > max_visible ? args.visible_keys[row] : max_visible;
  }
  if (max_visible <= 0) return;
  const int32_t groups = (max_visible + kLanes - 1) / kLanes;
  const int32_t quads = (num_queries + 3) / 4;
  // Scratch: the running maxima, one vector per quad of queries, then room
  // for one 16-key group of fp8 keys converted to bf16.
  float* best = args.page_scratch;
  auto* converted = reinterpret_cast<uint16_t*>(best + quads * kLanes);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  for (int32_t quad = 0; quad < quads; ++quad) _mm512_storeu_ps(best + quad * kLanes, neg_inf);

  // Lane 4k + m of a 4x4 score vector: query m of the quad, key k of the step.
  const __m512i lane_query = _mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  const __m512i lane_key = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512 nan_score = _mm512_set1_ps(-1e30f);
  const int64_t group_elements = static_cast<int64_t>(kLanes) * dim;
  const int64_t group_bytes = group_elements * KeyDtypeBytes(args.key_dtype);
  for (int32_t group = 0; group < groups; ++group) {
    // One group's worth of the next page per group of this one; the rest
    // after the last group when this page is only partly visible.
    PrefetchPageSlice(
        args.next_page, group * group_bytes,
        group + 1 < groups ? (group + 1) * group_bytes : kBlockSize / kLanes * group_bytes);
    // Whole groups are scored; lanes past a row's visible keys are masked,
    // so whatever the page holds there never reaches a result.
    const uint16_t* group_keys;
    if (args.key_dtype == KeyDtype::kBf16) {
      group_keys = static_cast<const uint16_t*>(args.page) + group * group_elements;
    } else {
      ConvertFp8ToBf16(static_cast<const uint8_t*>(args.page) + group * group_elements,
                       group_elements, converted);
      group_keys = converted;
    }
    for (int32_t quad = 0; quad < quads; ++quad) {
      // Past num_queries the last query repeats; those lanes are never read.
      const float* query[4];
      int32_t remaining[4];
      for (int m = 0; m < 4; ++m) {
        const int32_t q = quad * 4 + m < num_queries ? quad * 4 + m : num_queries - 1;
        query[m] = args.queries + static_cast<int64_t>(q) * dim;
        remaining[m] = args.visible_keys[q / args.num_heads] - group * kLanes;
      }
      if (remaining[0] <= 0 && remaining[1] <= 0 && remaining[2] <= 0 && remaining[3] <= 0) {
        continue;
      }
      const __m512i lane_remaining = _mm512_permutexvar_epi32(
          lane_query,
          _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(remaining))));
      __m512 quad_best = _mm512_loadu_ps(best + quad * kLanes);
      for (int32_t step = 0; step < kLanes / 4; ++step) {
        __m512 scores = ScoreFourByFour(query, group_keys + step * 4 * dim, dim);
        scores =
            _mm512_mask_mov_ps(scores, _mm512_cmp_ps_mask(scores, scores, _CMP_UNORD_Q), nan_score);
        const __mmask16 visible = _mm512_cmplt_epi32_mask(
            _mm512_add_epi32(lane_key, _mm512_set1_epi32(step * 4)), lane_remaining);
        quad_best = _mm512_mask_max_ps(quad_best, visible, quad_best, scores);
      }
      _mm512_storeu_ps(best + quad * kLanes, quad_best);
    }
  }
  for (int32_t q = 0; q < num_queries; ++q) {
    if (args.visible_keys[q / args.num_heads] <= 0) continue;
    const float* lanes = best + (q / 4) * kLanes + q % 4;
    float maximum = lanes[0];
    for (int k = 1; k < 4; ++k) maximum = lanes[4 * k] > maximum ? lanes[4 * k] : maximum;
    args.block_max[q] = maximum;
  }
}

}  // namespace

const PageScorer& Avx512PageScorer() {
  static const PageScorer scorer{"avx512", &SplitQueries, &ScorePageAvx512};
  return scorer;
}

}  // namespace blocksel::cpu
