// The batch description a worker writes into a slot's metadata: which
// decode requests one selection covers. Plain data at fixed offsets, so a
// worker's kernel can copy it in and the server's host thread can read it.
//
//   [SlotBatchHeader][SlotDecodeRequest x num_requests]
//
// The slot's queries are [rows][H][D] bf16, rows = num_requests *
// tokens_per_request (padding requests included); with kSlotCarriesKeys the
// slot's keys hold, in request order, the [Q][D] keys of every request that
// is not padding, appended at seq_len - Q before selecting. The answer is
// int32 [H][rows][topk] block ids in the slot.
#ifndef BLOCKSEL_COLOCATED_SLOT_REQUEST_H_
#define BLOCKSEL_COLOCATED_SLOT_REQUEST_H_

#include <cstdint>

#include "colocated/slot_region.h"

namespace blocksel::colocated {

inline constexpr uint32_t kSlotCarriesKeys = 1;  // SlotBatchHeader::flags

struct SlotBatchHeader {
  uint64_t request_id = 0;  // the worker's own number, for its logs
  uint32_t layer = 0;       // absolute model layer, a selecting one
  uint32_t num_requests = 0;
  uint32_t tokens_per_request = 0;  // Q of every request
  uint32_t flags = 0;
};
static_assert(sizeof(SlotBatchHeader) == 24);

struct SlotDecodeRequest {
  uint64_t sequence_id = 0;
  uint64_t seq_len = 0;  // tokens including the Q new ones; 0: padding
};
static_assert(sizeof(SlotDecodeRequest) == 16);

// The model's dimensions a region is sized for.
struct SlotModel {
  uint32_t num_heads = 0;
  uint32_t head_dim = 0;
  uint32_t key_token_bytes = 0;  // one token's index key
  uint32_t topk = 0;
};

// Sizes of a region whose slots each hold one selection of up to
// max_requests requests of tokens_per_request tokens (with their keys if
// with_keys).
RegionSizes SlotSizesFor(const SlotModel& model, uint32_t slot_count, uint32_t max_requests,
                         uint32_t tokens_per_request, bool with_keys);

}  // namespace blocksel::colocated

#endif  // BLOCKSEL_COLOCATED_SLOT_REQUEST_H_
