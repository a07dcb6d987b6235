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
  int32_t head_dim = 0;  // multiple of 16
  // fp32 [num_rows][num_heads][head_dim] in the scorer's query layout (see
  // PageScorer::prepare_queries).
  const float* queries = nullptr;
  int32_t num_rows = 0;
  int32_t num_heads = 0;
  // Per row: keys 0 .. visible_keys[row]-1 of the page count (0..kBlockSize).
  // A row with 0 visible keys is skipped and its outputs are left untouched.
  const int32_t* visible_keys = nullptr;
  float* page_scratch = nullptr;  // PageScratchFloats(...) floats, private
  float* block_max = nullptr;     // out: [num_rows][num_heads]
  // The page the caller scores next, or nullptr. Scoring a page takes about
  // as long as fetching one from memory, and the next page sits elsewhere in
  // the pool where the hardware prefetchers do not look: the scorer requests
  // it into L2 a slice at a time while it computes, so the fetch overlaps
  // the arithmetic instead of following it.
  const void* next_page = nullptr;
};

// Requests bytes [begin, end) of page into L2 (no-op for nullptr).
inline void PrefetchPageSlice(const void* page, int64_t begin, int64_t end) {
  if (page == nullptr) return;
  const char* bytes = static_cast<const char*>(page);
  for (int64_t offset = begin; offset < end; offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 2);
  }
}

// Floats of scratch a scorer needs for num_queries = num_rows * num_heads.
inline int64_t PageScratchFloats(int32_t head_dim, int32_t num_queries) {
  return static_cast<int64_t>(kBlockSize) * head_dim + 16 * int64_t{num_queries};
}

// One implementation of the page scoring loop.
struct PageScorer {
  const char* name;
  // Writes count fp32 query vectors of head_dim elements from natural order
  // into the order score_page reads (a permutation within each vector).
  void (*prepare_queries)(const float* queries, int64_t count, int32_t head_dim, float* out);
  void (*score_page)(const PageScoreArgs& args);
};

// Plain C++ for any CPU and any head_dim.
const PageScorer& PortablePageScorer();

// AVX-512F, head_dim a multiple of 32; use only where the CPU has AVX-512F.
const PageScorer& Avx512PageScorer();

// The fastest scorer this CPU runs for head_dim (CPU checked once).
const PageScorer& BestPageScorer(int32_t head_dim);

}  // namespace blocksel::cpu

#endif  // BLOCKSEL_KERNELS_CPU_PAGE_SCORER_H_
