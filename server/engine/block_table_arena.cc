#include "server/engine/block_table_arena.h"

namespace blocksel {

BlockTableArena::BlockTableArena(int64_t capacity) : capacity_(capacity) {}

int32_t BlockTableArena::SizeClass(int32_t blocks) {
  int32_t size_class = 0;
  while (ClassEntries(size_class) < blocks) ++size_class;
  return size_class;
}

std::optional<int64_t> BlockTableArena::Allocate(int32_t size_class) {
  if (size_class < static_cast<int32_t>(free_.size()) && !free_[size_class].empty()) {
    const int64_t offset = free_[size_class].back();
    free_[size_class].pop_back();
    return offset;
  }
  if (next_ + ClassEntries(size_class) > capacity_) return std::nullopt;
  const int64_t offset = next_;
  next_ += ClassEntries(size_class);
  return offset;
}

void BlockTableArena::Free(const Segment& segment) {
  if (segment.offset < 0) return;
  if (segment.size_class >= static_cast<int32_t>(free_.size()))
    free_.resize(segment.size_class + 1);
  free_[segment.size_class].push_back(segment.offset);
}

std::optional<BlockTableArena::Placement> BlockTableArena::Place(int32_t slot, int32_t blocks) {
  if (slot >= static_cast<int32_t>(segments_.size())) segments_.resize(slot + 1);
  Segment& segment = segments_[slot];
  if (segment.offset >= 0 && ClassEntries(segment.size_class) >= blocks) {
    return Placement{segment.offset, segment.resident};
  }
  const int32_t size_class = SizeClass(blocks);
  const std::optional<int64_t> offset = Allocate(size_class);
  if (!offset.has_value()) return std::nullopt;
  Free(segment);
  segment = {*offset, size_class, 0};
  return Placement{segment.offset, 0};
}

void BlockTableArena::MarkResident(int32_t slot, int32_t blocks) {
  Segment& segment = segments_[slot];
  if (blocks > segment.resident) segment.resident = blocks;
}

void BlockTableArena::Forget(int32_t slot) {
  if (slot >= static_cast<int32_t>(segments_.size())) return;
  Free(segments_[slot]);
  segments_[slot] = Segment{};
}

void BlockTableArena::Reset() {
  segments_.clear();
  free_.clear();
  next_ = 0;
}

}  // namespace blocksel
