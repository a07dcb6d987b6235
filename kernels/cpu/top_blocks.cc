#include "kernels/cpu/top_blocks.h"

namespace blocksel::cpu {

void SelectTopBlocks(const float* block_scores, int32_t valid_blocks, int32_t topk,
                     int32_t init_blocks, int32_t local_blocks, int32_t* out) {
  const int32_t first_local = valid_blocks - local_blocks;
  auto priority = [&](int32_t block) {
    if (block >= first_local) return kLocalPriority;
    if (block < init_blocks) return kInitPriority;
    return block_scores[block];
  };
  // out[0, kept) stays sorted best first. Blocks arrive in ascending id order,
  // so a newcomer goes after every kept block of equal priority, and enters a
  // full row only with a strictly larger priority.
  int32_t kept = 0;
  for (int32_t block = 0; block < valid_blocks; ++block) {
    const float value = priority(block);
    if (kept == topk && !(value > priority(out[kept - 1]))) continue;
    int32_t slot = kept < topk ? kept++ : topk - 1;
    while (slot > 0 && value > priority(out[slot - 1])) {
      out[slot] = out[slot - 1];
      --slot;
    }
    out[slot] = block;
  }
  for (int32_t i = kept; i < topk; ++i) out[i] = -1;
}

}  // namespace blocksel::cpu
