// Where each sequence's block table lives in a device-resident array, so
// that a selection uploads only the entries the device lacks instead of
// every table it reads. Host bookkeeping only; the GPU backend owns the
// device array and copies entries into it.
#ifndef BLOCKSEL_SERVER_ENGINE_BLOCK_TABLE_ARENA_H_
#define BLOCKSEL_SERVER_ENGINE_BLOCK_TABLE_ARENA_H_

#include <cstdint>
#include <optional>
#include <vector>

namespace blocksel {

// Each table slot (KeyCache's Sequence::table_slot) gets a segment of the
// arena's entries: a power of two of at least kMinSegment, doubled when its
// table outgrows it (the table then moves, and must be copied whole). Freed
// segments are reused by their size class. When no segment fits, Reset
// forgets every placement, so tables are placed and copied afresh on their
// next use: device work still reading old places runs before any new copy
// in stream order, so nothing in flight is disturbed.
//
// Thread-compatible.
class BlockTableArena {
 public:
  static constexpr int32_t kMinSegment = 16;

  explicit BlockTableArena(int64_t capacity);

  struct Placement {
    int64_t offset = 0;    // first entry of the slot's segment
    int32_t resident = 0;  // leading entries already on the device
  };
  // The segment for slot's table of `blocks` entries; nullopt when the
  // arena has no room for it (Reset, then place again).
  std::optional<Placement> Place(int32_t slot, int32_t blocks);
  // The first `blocks` entries of slot's table are now on the device.
  void MarkResident(int32_t slot, int32_t blocks);
  // The slot's sequence is gone: its segment is free.
  void Forget(int32_t slot);
  // Forgets every placement.
  void Reset();

  int64_t capacity() const { return capacity_; }

 private:
  struct Segment {
    int64_t offset = -1;  // -1: none
    int32_t size_class = 0;
    int32_t resident = 0;
  };
  static int32_t SizeClass(int32_t blocks);
  static int64_t ClassEntries(int32_t size_class) { return int64_t{kMinSegment} << size_class; }
  std::optional<int64_t> Allocate(int32_t size_class);
  void Free(const Segment& segment);

  const int64_t capacity_;
  std::vector<Segment> segments_;           // by slot
  std::vector<std::vector<int64_t>> free_;  // free offsets by size class
  int64_t next_ = 0;                        // entries never allocated start here
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_BLOCK_TABLE_ARENA_H_
