// AVX-512F page scorer. This file alone is compiled with -mavx512f; it is only
// entered through BestPageScorer(), after a run-time CPU check, so the rest of
// the binary stays portable. It uses intrinsics and plain loops only, so no
// inline function compiled for AVX-512 can leak into portable callers.
#include <immintrin.h>

#include "kernels/cpu/page_scorer.h"

namespace blocksel::cpu {
namespace {

constexpr int kLanes = 16;

// bf16 -> fp32 is a 16-bit left shift of the bit pattern: exact.
void ConvertBf16(const uint16_t* src, int64_t count, float* out) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const __m256i packed =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16);
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(widened));
  }
}

// e4m3fn -> fp32, exactly: place exponent and mantissa at fp32's mantissa top
// (a float of value 2^(e-127) * (1 + m/8), or a denormal for e = 0), rescale
// by 2^120 to move the bias from 127 to 7, patch NaN (0x7f) and the sign.
// Relies on denormals not being flushed (the default MXCSR).
void ConvertFp8(const uint8_t* src, int64_t count, float* out) {
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7F);
  const __m512 rescale = _mm512_set1_ps(1.329227995784916e36f);  // 2^120
  const __m512 nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  for (int64_t i = 0; i < count; i += kLanes) {
    const __m128i packed =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m512i bytes = _mm512_cvtepu8_epi32(packed);
    const __m512i magnitude = _mm512_and_si512(bytes, magnitude_mask);
    __m512 value = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_slli_epi32(magnitude, 20)), rescale);
    const __mmask16 is_nan = _mm512_cmpeq_epi32_mask(magnitude, magnitude_mask);
    value = _mm512_mask_mov_ps(value, is_nan, nan);
    const __m512i sign = _mm512_slli_epi32(
        _mm512_andnot_si512(magnitude_mask, bytes), 24);
    value = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(value), sign));
    _mm512_storeu_ps(out + i, value);
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
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(pairs[2 * i]),
                                          _mm512_castps_pd(pairs[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(pairs[2 * i]),
                                          _mm512_castps_pd(pairs[2 * i + 1]));
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // quads[k], 128-bit lane L, element m: partial sum of acc[4k+m] over lane L.
  const __m512 half0 =
      _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                    _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 half1 =
      _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(half0, half1, 0x88),
                       _mm512_shuffle_f32x4(half0, half1, 0xDD));
}

}  // namespace

void ScorePageAvx512(const PageScoreArgs& args) {
  const int32_t dim = args.head_dim;
  const int32_t chunks = dim / kLanes;
  const int32_t num_queries = args.num_rows * args.num_heads;
  int32_t max_visible = 0;
  for (int32_t row = 0; row < args.num_rows; ++row) {
    max_visible = args.visible_keys[row] > max_visible ? args.visible_keys[row]
                                                        : max_visible;
  }
  if (max_visible <= 0) return;
  const int32_t groups = (max_visible + kLanes - 1) / kLanes;
  // Whole groups are converted; lanes past a row's visible keys are masked,
  // so whatever the page holds there never reaches a result.
  const int64_t converted = static_cast<int64_t>(groups) * kLanes * dim;
  if (args.key_dtype == KeyDtype::kBf16) {
    ConvertBf16(static_cast<const uint16_t*>(args.page), converted,
                args.page_scratch);
  } else {
    ConvertFp8(static_cast<const uint8_t*>(args.page), converted,
               args.page_scratch);
  }

  const __m512 nan_score = _mm512_set1_ps(-1e30f);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  // Queries go 16 at a time, their running maxima in registers, so that each
  // 16-key group (8 KB at D = 128) stays in L1 while it serves all of them.
  for (int32_t first_query = 0; first_query < num_queries; first_query += 16) {
    const int32_t pass_queries =
        num_queries - first_query < 16 ? num_queries - first_query : 16;
    __m512 best[16];
    for (int32_t q = 0; q < pass_queries; ++q) best[q] = neg_inf;
    for (int32_t group = 0; group < groups; ++group) {
      const float* group_keys = args.page_scratch + group * kLanes * dim;
      for (int32_t q = 0; q < pass_queries; ++q) {
        const int32_t query_index = first_query + q;
        const int32_t remaining =
            args.visible_keys[query_index / args.num_heads] - group * kLanes;
        if (remaining <= 0) continue;
        const float* query = args.queries + static_cast<int64_t>(query_index) * dim;
        __m512 acc[kLanes];
        for (int j = 0; j < kLanes; ++j) acc[j] = _mm512_setzero_ps();
        for (int32_t c = 0; c < chunks; ++c) {
          const __m512 query_chunk = _mm512_loadu_ps(query + c * kLanes);
          for (int j = 0; j < kLanes; ++j) {
            acc[j] = _mm512_fmadd_ps(
                query_chunk, _mm512_loadu_ps(group_keys + j * dim + c * kLanes),
                acc[j]);
          }
        }
        __m512 scores = ReduceSixteen(acc);
        const __mmask16 is_nan = _mm512_cmp_ps_mask(scores, scores, _CMP_UNORD_Q);
        scores = _mm512_mask_mov_ps(scores, is_nan, nan_score);
        const __mmask16 visible =
            remaining >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                : static_cast<__mmask16>((1u << remaining) - 1u);
        best[q] = _mm512_mask_max_ps(best[q], visible, best[q], scores);
      }
    }
    for (int32_t q = 0; q < pass_queries; ++q) {
      const int32_t query_index = first_query + q;
      if (args.visible_keys[query_index / args.num_heads] <= 0) continue;
      args.block_max[query_index] = _mm512_reduce_max_ps(best[q]);
    }
  }
}

}  // namespace blocksel::cpu
