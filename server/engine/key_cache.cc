#include "server/engine/key_cache.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace blocksel {
namespace {

int64_t BlocksFor(int64_t tokens) { return (tokens + kBlockSize - 1) / kBlockSize; }

std::string NotOpenMessage(uint64_t id) {
  return absl::StrCat("sequence ", id,
                      " is not open (never opened, released, or its lease "
                      "expired); open it with OpenSequence first");
}

}  // namespace

KeyCache::KeyCache(const ModelConfig& config, int64_t num_pages, int64_t max_sequences,
                   KeyStore* store)
    : config_(config), max_sequences_(max_sequences), store_(store), pool_(num_pages) {}

absl::StatusOr<uint64_t> KeyCache::Open(uint64_t requested_id, absl::Duration lease,
                                        absl::Time now) {
  if (static_cast<int64_t>(sequences_.size()) >= max_sequences_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many open sequences (limit ", max_sequences_,
                     "); release finished sequences or raise --max_sequences"));
  }
  uint64_t id = requested_id;
  if (id == 0) {
    while (next_id_ == 0 || sequences_.contains(next_id_)) ++next_id_;
    id = next_id_++;
  } else if (sequences_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " is already open"));
  }
  Sequence& sequence = sequences_[id];
  sequence.id = id;
  if (free_table_slots_.empty()) {
    sequence.table_slot = next_table_slot_++;
  } else {
    sequence.table_slot = free_table_slots_.back();
    free_table_slots_.pop_back();
  }
  sequence.layer_fill.assign(config_.num_key_layers(), 0);
  sequence.lease = lease;
  sequence.last_used = now;
  return id;
}

bool KeyCache::Release(uint64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return false;
  pool_.Free(it->second.block_table);
  store_->ForgetBlockTable(it->second.table_slot);
  free_table_slots_.push_back(it->second.table_slot);
  sequences_.erase(it);
  return true;
}

absl::Status KeyCache::Renew(absl::Span<const uint64_t> ids, absl::Time now) {
  for (uint64_t id : ids) {
    if (!sequences_.contains(id)) return absl::NotFoundError(NotOpenMessage(id));
  }
  for (uint64_t id : ids) sequences_[id].last_used = now;
  return absl::OkStatus();
}

const Sequence* KeyCache::Find(uint64_t id) const {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : &it->second;
}

void KeyCache::Touch(uint64_t id, absl::Time now) {
  auto it = sequences_.find(id);
  if (it != sequences_.end()) it->second.last_used = now;
}

absl::Status KeyCache::ValidateRanges(absl::Span<const KeyRange> ranges,
                                      int64_t* pages_needed) const {
  // Fill and block-table length each sequence would have after the ranges
  // before it, so several ranges of one sequence validate like serial ones.
  absl::flat_hash_map<uint64_t, std::vector<int64_t>> fill_after;
  absl::flat_hash_map<uint64_t, int64_t> blocks_after;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const KeyRange& range = ranges[i];
    const std::string where = absl::StrCat("append ", i, " (sequence ", range.sequence_id, ")");
    if (range.num_layers < 1 || range.first_layer_index < 0 ||
        range.first_layer_index + range.num_layers > config_.num_key_layers()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": key layers [", range.first_layer_index, ", ",
          range.first_layer_index + range.num_layers, ") are not all stored; the cache stores ",
          config_.num_key_layers(), " layers (", absl::StrJoin(config_.KeyLayerList(), ","), ")"));
    }
    if (range.num_tokens < 1) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": num_tokens must be >= 1"));
    }
    if (range.start_position < 0 ||
        range.start_position > config_.max_positions - range.num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tokens [", range.start_position, ", ", range.start_position + range.num_tokens,
          ") pass the server's max_positions ", config_.max_positions));
    }
    const int64_t expected_bytes = range.num_layers * range.num_tokens * config_.TokenBytes();
    if (range.keys_size != expected_bytes || range.keys == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": keys must be ", expected_bytes, " bytes ([", range.num_layers,
                       " layers, ", range.num_tokens, " tokens, ", config_.head_dim, " x ",
                       KeyDtypeName(config_.key_dtype), "]), got ", range.keys_size));
    }
    const Sequence* sequence = Find(range.sequence_id);
    if (sequence == nullptr) {
      return absl::NotFoundError(NotOpenMessage(range.sequence_id));
    }
    auto [fill_it, new_fill] = fill_after.try_emplace(range.sequence_id);
    if (new_fill) fill_it->second = sequence->layer_fill;
    for (int32_t l = 0; l < range.num_layers; ++l) {
      int64_t& fill = fill_it->second[range.first_layer_index + l];
      if (range.start_position > fill) {
        return absl::FailedPreconditionError(
            absl::StrCat(where, ": layer ", config_.KeyLayerList()[range.first_layer_index + l],
                         " holds ", fill, " tokens, so an append must start at or before ",
                         "position ", fill, ", got ", range.start_position));
      }
      fill = range.start_position + range.num_tokens;
    }
    auto [blocks_it, new_blocks] = blocks_after.try_emplace(range.sequence_id);
    if (new_blocks) {
      blocks_it->second = static_cast<int64_t>(sequence->block_table.size());
    }
    const int64_t blocks = BlocksFor(range.start_position + range.num_tokens);
    if (blocks > blocks_it->second) {
      *pages_needed += blocks - blocks_it->second;
      blocks_it->second = blocks;
    }
  }
  return absl::OkStatus();
}

absl::Status KeyCache::Append(absl::Span<const KeyRange> ranges, absl::Time now,
                              std::vector<KeyWrite>* deferred) {
  int64_t pages_needed = 0;
  absl::Status valid = ValidateRanges(ranges, &pages_needed);
  if (!valid.ok()) return valid;
  std::vector<int32_t> pages;
  absl::Status allocated = pool_.Allocate(pages_needed, &pages);
  if (!allocated.ok()) return allocated;

  std::vector<KeyWrite> writes;
  size_t next_page = 0;
  const int64_t token_bytes = config_.TokenBytes();
  for (const KeyRange& range : ranges) {
    Sequence& sequence = sequences_[range.sequence_id];
    const int64_t end = range.start_position + range.num_tokens;
    while (static_cast<int64_t>(sequence.block_table.size()) < BlocksFor(end)) {
      sequence.block_table.push_back(pages[next_page++]);
    }
    for (int32_t l = 0; l < range.num_layers; ++l) {
      const uint8_t* layer_keys = range.keys + l * range.num_tokens * token_bytes;
      for (int64_t position = range.start_position; position < end;) {
        const int64_t block = position / kBlockSize;
        const int64_t slot = position % kBlockSize;
        const int64_t count = std::min(kBlockSize - slot, end - position);
        KeyWrite write;
        write.layer_index = range.first_layer_index + l;
        write.page = sequence.block_table[block];
        write.first_slot = static_cast<int32_t>(slot);
        write.num_tokens = static_cast<int32_t>(count);
        write.keys = layer_keys + (position - range.start_position) * token_bytes;
        writes.push_back(write);
        position += count;
      }
      sequence.layer_fill[range.first_layer_index + l] = end;
    }
    sequence.last_used = now;
  }
  if (deferred != nullptr) {
    deferred->insert(deferred->end(), writes.begin(), writes.end());
    return absl::OkStatus();
  }
  return store_->WriteKeys(writes);
}

int64_t KeyCache::ReleaseExpired(absl::Time now) {
  std::vector<uint64_t> expired;
  for (const auto& [id, sequence] : sequences_) {
    if (sequence.last_used + sequence.lease < now) expired.push_back(id);
  }
  for (uint64_t id : expired) Release(id);
  return static_cast<int64_t>(expired.size());
}

std::vector<const Sequence*> KeyCache::Sequences() const {
  std::vector<const Sequence*> open;
  open.reserve(sequences_.size());
  for (const auto& [id, sequence] : sequences_) open.push_back(&sequence);
  std::sort(open.begin(), open.end(),
            [](const Sequence* a, const Sequence* b) { return a->id < b->id; });
  return open;
}

CacheStats KeyCache::stats() const {
  CacheStats stats;
  stats.total_pages = pool_.total_pages();
  stats.free_pages = pool_.free_pages();
  stats.open_sequences = static_cast<int64_t>(sequences_.size());
  return stats;
}

}  // namespace blocksel
