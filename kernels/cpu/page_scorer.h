// Scores one key page against a tile of queries: the innermost CPU loop.
//
// The block score of (row, head) over a page is the maximum of q.k over the
// keys of that page the row can see, accumulated in fp32 with keys converted
// exactly to fp32. A NaN token score counts as -1e30 (SEMANTICS.md).
#ifndef BLOCKSEL_KERNELS_CPU_PAGE_SCORER_H_
#define BLOCKSEL_KERNELS_CPU_PAGE_SCORER_H_

#include <cstdint>

#include "kernels/selection_types.h"

namespace blocksel::cpu {

struct PageScoreArgs {
  const void* page = nullptr;  // [kBlockSize][head_dim] keys of key_dtype
  KeyDtype key_dtype = KeyDtype::kBf16;
  int32_t head_dim = 0;        // multiple of 16
  const float* queries = nullptr;  // fp32 [num_rows][num_heads][head_dim]
  int32_t num_rows = 0;
  int32_t num_heads = 0;
  // Per row: keys 0 .. visible_keys[row]-1 of the page count (0..kBlockSize).
  // A row with 0 visible keys is skipped and its outputs are left untouched.
  const int32_t* visible_keys = nullptr;
  float* page_scratch = nullptr;  // >= kBlockSize * head_dim floats, private
  float* block_max = nullptr;     // out: [num_rows][num_heads]
};

using PageScoreFn = void (*)(const PageScoreArgs& args);

// Portable implementation (any x86-64 or other CPU).
void ScorePagePortable(const PageScoreArgs& args);

// AVX-512F implementation; call only where the CPU supports AVX-512F.
void ScorePageAvx512(const PageScoreArgs& args);

// The fastest implementation this CPU can run, picked once at run time.
PageScoreFn BestPageScorer();

// Name of the implementation BestPageScorer() returns ("avx512" or
// "portable"), for logs and benchmarks.
const char* BestPageScorerName();

}  // namespace blocksel::cpu

#endif  // BLOCKSEL_KERNELS_CPU_PAGE_SCORER_H_
