// The memory a co-located worker shares with the server: one region per
// attachment, in two parts laid out the same for both sides by
// RegionLayoutFor.
//
//   host part (shared memory, mapped into both processes and registered
//   with the GPU so both sides' kernels reach it):
//     [RegionHeader][SlotControl x slot_count][metadata x slot_count]
//   device part (the server's GPU memory, mapped into the worker through a
//   CUDA IPC handle):
//     [queries | keys | block ids] x slot_count
//
// The words and the batch description live in host memory because the
// server notices doorbells with a host thread, which cannot read GPU
// memory; the payloads live in GPU memory because the selection reads and
// writes them there.
//
// A slot carries one selection: the worker copies its queries, new keys and
// batch metadata into the slot, then rings the slot's doorbell; the server
// answers with block ids in the slot's payload, a status and a message in
// the slot's control block, then writes the completion word. Doorbell and
// completion words hold request sequence numbers (slot_protocol.h), so
// neither side ever resets a word: a slot is free again once its completion
// word holds the sequence its doorbell holds.
#ifndef BLOCKSEL_COLOCATED_SLOT_REGION_H_
#define BLOCKSEL_COLOCATED_SLOT_REGION_H_

#include <cstdint>

#include "absl/status/statusor.h"

namespace blocksel::colocated {

inline constexpr uint32_t kRegionMagic = 0x314C5342;  // "BSL1", little-endian
inline constexpr uint32_t kProtocolVersion = 1;
// Bytes of the error message a slot can carry (longer ones are cut).
inline constexpr int kMessageBytes = 244;
// Payload areas start on this boundary, so copies into them run at full
// width on the GPU.
inline constexpr int64_t kPayloadAlignment = 256;
// The most slots a region may have: a power of two well below 2^31, so
// sequence arithmetic modulo 2^32 maps every sequence to one slot.
inline constexpr uint32_t kMaxSlots = 1024;

// What an attachment asks for: a ring of slot_count slots, each with room
// for these payloads.
struct RegionSizes {
  uint32_t slot_count = 0;      // a power of two in [1, kMaxSlots]
  uint32_t query_bytes = 0;     // bf16 queries [rows][H][D] of one selection
  uint32_t key_bytes = 0;       // new tokens' keys appended with it (may be 0)
  uint32_t metadata_bytes = 0;  // the batch description
  uint32_t ids_bytes = 0;       // the answer: int32 [H][rows][topk]
};

// What RegionHeader::state holds. A worker's wait ends with an error once
// the region is not kServing, so a server that stops never leaves a worker
// waiting.
inline constexpr uint32_t kRegionServing = 1;
inline constexpr uint32_t kRegionClosed = 2;  // detached, expired or shut down

// At offset 0 of a region's host part, written by the server when it
// attaches the worker. server_epoch changes with every server process, so a
// worker that finds another epoch knows its region is gone.
struct RegionHeader {
  uint32_t magic = kRegionMagic;
  uint32_t version = kProtocolVersion;
  RegionSizes sizes;
  uint32_t server_epoch = 0;
  uint32_t state = kRegionServing;  // written by the server only
  uint32_t reserved[7] = {};
};
static_assert(sizeof(RegionHeader) == 64);

// One slot's words. The doorbell (written by the worker) and the server's
// words sit on different 128-byte lines, so neither side's writes move the
// other's line.
//
// answer_flag is what a worker's stream waits on (a GPU stream can wait for
// a word at a fixed address to hold a fixed value, so a captured graph
// waits correctly at every replay, while the sequence it waits for changes):
// the server sets it to 1 after the completion word, the worker clears it
// once it has taken the answer, and a closed region leaves it at 1 so no
// wait outlives the region.
struct alignas(128) SlotControl {
  uint32_t doorbell = 0;  // worker: the sequence of the request in the slot
  uint32_t answer_flag = 0;
  uint32_t worker_reserved[30] = {};
  uint32_t completion = 0;  // server: the sequence answered, written last
  int32_t status = 0;       // that answer's gRPC status code (0: OK)
  uint32_t message_bytes = 0;
  char message[kMessageBytes] = {};
};
static_assert(sizeof(SlotControl) == 384);

// Byte offsets of everything in a region of these sizes.
struct RegionLayout {
  RegionSizes sizes;
  // Host part.
  int64_t controls_offset = 0;  // SlotControl[slot_count]
  int64_t metadata_offset = 0;  // slot i's at metadata_offset + i * metadata_stride
  int64_t metadata_stride = 0;
  int64_t host_bytes = 0;
  // Device part: slot i's payload at i * slot_stride, and within it:
  int64_t slot_stride = 0;
  int64_t query_offset = 0;
  int64_t key_offset = 0;
  int64_t ids_offset = 0;
  int64_t device_bytes = 0;

  int64_t ControlOffset(uint32_t slot) const {
    return controls_offset + int64_t{slot} * static_cast<int64_t>(sizeof(SlotControl));
  }
  int64_t MetadataOffset(uint32_t slot) const {
    return metadata_offset + int64_t{slot} * metadata_stride;
  }
  int64_t PayloadOffset(uint32_t slot) const { return int64_t{slot} * slot_stride; }
};

// The layout of a region with these sizes; INVALID_ARGUMENT when the slot
// count is not a power of two in [1, kMaxSlots], a slot has no room for
// queries, metadata or ids, or the device part would exceed
// max_region_bytes (RESOURCE_EXHAUSTED then: the server's limit for one
// attachment).
absl::StatusOr<RegionLayout> RegionLayoutFor(const RegionSizes& sizes, int64_t max_region_bytes);

}  // namespace blocksel::colocated

#endif  // BLOCKSEL_COLOCATED_SLOT_REGION_H_
