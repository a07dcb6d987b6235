// Turns the block scores of one (token, head) into its output row.
#ifndef BLOCKSEL_KERNELS_CPU_TOP_BLOCKS_H_
#define BLOCKSEL_KERNELS_CPU_TOP_BLOCKS_H_

#include <cstdint>

namespace blocksel::cpu {

// Priority of a forced block: init blocks outrank local blocks, and both
// outrank any ordinary score (SEMANTICS.md, Selection).
inline constexpr float kInitPriority = 1e30f;
inline constexpr float kLocalPriority = 1e29f;

// Writes topk block ids to out: the min(topk, valid_blocks) visible blocks of
// highest priority (forced blocks first, then block_scores), ordered by
// priority descending and block id ascending among equals, then -1 padding.
//
// block_scores[b] for b < valid_blocks must be NaN-free (a NaN token score is
// already -1e30 in its block maximum); scores of forced blocks are ignored.
void SelectTopBlocks(const float* block_scores, int32_t valid_blocks, int32_t topk,
                     int32_t init_blocks, int32_t local_blocks, int32_t* out);

}  // namespace blocksel::cpu

#endif  // BLOCKSEL_KERNELS_CPU_TOP_BLOCKS_H_
