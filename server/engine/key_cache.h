// Index-key cache bookkeeping: sequences, block tables, per-layer fill,
// leases and page accounting. The key bytes live in a KeyStore.
#ifndef BLOCKSEL_SERVER_ENGINE_KEY_CACHE_H_
#define BLOCKSEL_SERVER_ENGINE_KEY_CACHE_H_

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"
#include "server/engine/page_pool.h"

namespace blocksel {

// One open sequence. One block table serves every sparse layer: logical
// block b of any layer lives in page block_table[b].
struct Sequence {
  uint64_t id = 0;
  // In [0, max_sequences), unique among open sequences; reused after a
  // release (the store is told: KeyStore::ForgetBlockTable).
  int32_t table_slot = 0;
  std::vector<int32_t> block_table;
  std::vector<int64_t> layer_fill;  // tokens present, per key layer index
  absl::Duration lease;
  absl::Time last_used;
};

// Keys for num_tokens consecutive tokens of num_layers consecutive sparse
// layers of one sequence, layer-major ([num_layers][num_tokens][D]).
struct KeyRange {
  uint64_t sequence_id = 0;
  int32_t first_layer_index = 0;  // key layer index (ModelConfig::KeyLayerIndex)
  int32_t num_layers = 1;
  int64_t start_position = 0;
  int64_t num_tokens = 0;
  const uint8_t* keys = nullptr;
  int64_t keys_size = 0;  // bytes at keys; must be exactly the range's size
};

struct CacheStats {
  int64_t total_pages = 0;
  int64_t free_pages = 0;
  int64_t open_sequences = 0;
};

// Thread-compatible: the engine serializes every call on its worker thread.
class KeyCache {
 public:
  KeyCache(const ModelConfig& config, int64_t num_pages, int64_t max_sequences, KeyStore* store);

  // Opens requested_id, or a fresh id when it is 0. ALREADY_EXISTS if open,
  // RESOURCE_EXHAUSTED past max_sequences.
  absl::StatusOr<uint64_t> Open(uint64_t requested_id, absl::Duration lease, absl::Time now);

  // Frees the sequence's pages. False when it was not open.
  bool Release(uint64_t id);

  // Marks sequences as used at now. NOT_FOUND (and nothing renewed) if any
  // is not open.
  absl::Status Renew(absl::Span<const uint64_t> ids, absl::Time now);

  // Writes every range, or none: INVALID_ARGUMENT (layers, positions),
  // NOT_FOUND (sequence), FAILED_PRECONDITION (a range starts past a layer's
  // fill), RESOURCE_EXHAUSTED (not enough free pages). Ranges apply in
  // order; each sets its layers' fill to start_position + num_tokens.
  // The keys go to the store, or, with `deferred`, are appended there for
  // the caller to hand to the store with its next operation (a selection
  // that carries its keys); the ranges' bytes must then outlive that.
  absl::Status Append(absl::Span<const KeyRange> ranges, absl::Time now,
                      std::vector<KeyWrite>* deferred = nullptr);

  // The open sequence with this id, or nullptr. Valid until the next
  // non-const call.
  const Sequence* Find(uint64_t id) const;

  // Marks an open sequence as used at now; no-op for unknown ids.
  void Touch(uint64_t id, absl::Time now);

  // Releases every sequence whose lease ran out before now; returns how many.
  int64_t ReleaseExpired(absl::Time now);

  CacheStats stats() const;

  // Every open sequence, by ascending id. Valid until the next non-const
  // call.
  std::vector<const Sequence*> Sequences() const;

 private:
  absl::Status ValidateRanges(absl::Span<const KeyRange> ranges, int64_t* pages_needed) const;

  const ModelConfig config_;
  const int64_t max_sequences_;
  KeyStore* const store_;
  PagePool pool_;
  absl::flat_hash_map<uint64_t, Sequence> sequences_;
  uint64_t next_id_ = 1;
  std::vector<int32_t> free_table_slots_;  // released slots, reused first
  int32_t next_table_slot_ = 0;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_KEY_CACHE_H_
