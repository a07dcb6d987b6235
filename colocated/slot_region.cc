#include "colocated/slot_region.h"

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace blocksel::colocated {
namespace {

int64_t AlignUp(int64_t bytes, int64_t unit) { return (bytes + unit - 1) / unit * unit; }

}  // namespace

absl::StatusOr<RegionLayout> RegionLayoutFor(const RegionSizes& sizes, int64_t max_region_bytes) {
  const uint32_t slots = sizes.slot_count;
  if (slots < 1 || slots > kMaxSlots || (slots & (slots - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("slot_count ", slots,
                                                   " is not a power of two in [1, ", kMaxSlots,
                                                   "]; ask for 1, 2, 4, ... slots"));
  }
  if (sizes.query_bytes == 0 || sizes.metadata_bytes == 0 || sizes.ids_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("a slot needs room for queries, metadata and block ids (query_bytes ",
                     sizes.query_bytes, ", metadata_bytes ", sizes.metadata_bytes, ", ids_bytes ",
                     sizes.ids_bytes, "); size them for the largest batch"));
  }
  RegionLayout layout;
  layout.sizes = sizes;
  // SlotControl is 128-byte aligned (its two sides' words on separate lines),
  // and the header is only 64 bytes.
  layout.controls_offset = AlignUp(static_cast<int64_t>(sizeof(RegionHeader)),
                                   static_cast<int64_t>(alignof(SlotControl)));
  layout.metadata_offset = AlignUp(layout.ControlOffset(slots), kPayloadAlignment);
  layout.metadata_stride = AlignUp(sizes.metadata_bytes, kPayloadAlignment);
  layout.host_bytes = layout.MetadataOffset(slots);
  layout.query_offset = 0;
  layout.key_offset = AlignUp(layout.query_offset + sizes.query_bytes, kPayloadAlignment);
  layout.ids_offset = AlignUp(layout.key_offset + sizes.key_bytes, kPayloadAlignment);
  layout.slot_stride = AlignUp(layout.ids_offset + sizes.ids_bytes, kPayloadAlignment);
  layout.device_bytes = layout.PayloadOffset(slots);
  if (layout.device_bytes > max_region_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a region of ", slots, " slots of ", layout.slot_stride, " bytes needs ",
                     layout.device_bytes, " bytes of GPU memory, above the server's ",
                     max_region_bytes, " per attachment; ask for fewer or smaller slots"));
  }
  return layout;
}

}  // namespace blocksel::colocated
