// Plain data shared by every selection backend (CPU, CUDA, HIP).
//
// Nothing here depends on a runtime, an RPC library or a logging library, so
// host code and device code can both include it. See
// ../shared/spec/SEMANTICS.md (mirrored in docs/SEMANTICS.md) for the meaning
// of every field.
#ifndef BLOCKSEL_KERNELS_SELECTION_TYPES_H_
#define BLOCKSEL_KERNELS_SELECTION_TYPES_H_

#include <cstdint>

namespace blocksel {

// Tokens per sparse block; one block is exactly one page of the key cache.
inline constexpr int32_t kBlockSize = 128;

// Callable from host code and from CUDA/HIP device code.
#if defined(__CUDACC__)
#define BLOCKSEL_HOST_DEVICE __host__ __device__
#elif defined(__HIP__)
#define BLOCKSEL_HOST_DEVICE __attribute__((host, device))
#else
#define BLOCKSEL_HOST_DEVICE
#endif

// Blocks a query token at `position` sees (SEMANTICS.md: valid(p) =
// floor(p / 128) + 1); 0 for padding (a negative position).
BLOCKSEL_HOST_DEVICE constexpr int32_t VisibleBlocks(int64_t position) {
  return position < 0 ? 0 : static_cast<int32_t>(position / kBlockSize + 1);
}

// Limits every backend supports: heads per token, elements per head.
inline constexpr int32_t kMaxHeads = 64;
inline constexpr int32_t kMaxHeadDim = 512;

// Element type of the index keys stored in the cache.
enum class KeyDtype : int32_t {
  kBf16 = 0,     // bfloat16, little-endian
  kFp8E4m3 = 1,  // OCP e4m3fn: bias 7, max finite 448, no infinities
};

constexpr int32_t KeyDtypeBytes(KeyDtype dtype) { return dtype == KeyDtype::kBf16 ? 2 : 1; }

// Result of a kernel entry point. Kernels never throw and never log.
enum class KernelStatus : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // a size or pointer breaks the documented contract
  kUnsupported = 2,      // valid, but this backend cannot run that shape
  kDeviceError = 3,      // the device runtime reported a failure
};

// The selection parameters fixed by the model (one per server).
struct SelectionShape {
  int32_t num_heads = 0;  // index heads H per query token, <= kMaxHeads
  int32_t head_dim = 0;   // D: multiple of 16, <= kMaxHeadDim
  KeyDtype key_dtype = KeyDtype::kBf16;
  int32_t topk = 0;          // selected blocks per (token, head)
  int32_t init_blocks = 0;   // leading blocks forced with priority 1e30
  int32_t local_blocks = 0;  // trailing visible blocks forced with 1e29
};

// A run of consecutive query rows that belong to one sequence.
//
// Row i of the span sits at absolute position first_position + i. A row at a
// negative position is padding: its output row is all -1 (a decode request
// with seq_len 0 and Q query tokens is a span of Q rows starting at -Q).
struct RowSpan {
  const int32_t* block_table = nullptr;  // logical block -> physical page
  int32_t first_position = 0;
  int32_t num_rows = 0;
  int32_t first_row = 0;  // index of the span's first row in the batch
  // The sequence's handle in the caller's table store (stable while the
  // sequence lives; -1 for padding). A backend may keep its own copy of the
  // block table under it (a GPU keeps one in device memory) and upload only
  // the entries it lacks, since tables only ever grow at the end.
  int32_t table_slot = -1;
};

// One selection launch over one layer of the paged key cache.
//
// The caller guarantees that every key at a position <= the position of some
// row of a span is present in the pages its block table names; the tail of
// the last page may hold garbage, which never influences the result.
struct SelectionBatch {
  const void* key_pool = nullptr;  // [num_pages][kBlockSize][head_dim] keys
  int64_t num_pages = 0;
  const RowSpan* spans = nullptr;
  int32_t num_spans = 0;
  const uint16_t* queries = nullptr;  // bf16 [total_rows][num_heads][head_dim]
  int32_t total_rows = 0;
  int32_t* block_ids = nullptr;  // int32 [num_heads][total_rows][topk]
  // Optional: also the raw block scores, float [num_heads][total_rows]
  // [max_blocks]: for each block a row sees, the max of q.k over its keys
  // the row sees (NaN token scores as -1e30); -inf for the other blocks.
  // max_blocks must cover the visible blocks of every row.
  float* block_scores = nullptr;
  int32_t max_blocks = 0;
};

// Checks the invariants every backend relies on. Pure host code.
KernelStatus ValidateSelection(const SelectionShape& shape, const SelectionBatch& batch);

}  // namespace blocksel

#endif  // BLOCKSEL_KERNELS_SELECTION_TYPES_H_
