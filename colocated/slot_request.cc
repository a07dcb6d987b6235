#include "colocated/slot_request.h"

#include <cstdint>

namespace blocksel::colocated {

RegionSizes SlotSizesFor(const SlotModel& model, uint32_t slot_count, uint32_t max_requests,
                         uint32_t tokens_per_request, bool with_keys) {
  const uint64_t rows = uint64_t{max_requests} * tokens_per_request;
  // Sizes past 32 bits are clamped to the largest value, which the region
  // limit then refuses with its own message.
  auto clamp = [](uint64_t bytes) {
    return static_cast<uint32_t>(bytes > UINT32_MAX ? UINT32_MAX : bytes);
  };
  RegionSizes sizes;
  sizes.slot_count = slot_count;
  sizes.query_bytes = clamp(rows * model.num_heads * model.head_dim * 2);
  sizes.key_bytes = with_keys ? clamp(rows * model.key_token_bytes) : 0;
  sizes.metadata_bytes =
      clamp(sizeof(SlotBatchHeader) + uint64_t{max_requests} * sizeof(SlotDecodeRequest));
  sizes.ids_bytes = clamp(rows * model.num_heads * model.topk * 4);
  return sizes;
}

}  // namespace blocksel::colocated
