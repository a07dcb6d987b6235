#include "server/engine/key_cache.h"

#include <cstdint>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"

namespace blocksel {
namespace {

// Keeps every (sparse layer, page) as a byte buffer, so a test can check
// where each write landed.
class InMemoryKeyStore : public KeyStore {
 public:
  explicit InMemoryKeyStore(const ModelConfig& config) : config_(config) {}

  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override {
    ++write_calls_;
    const int64_t token_bytes = config_.TokenBytes();
    for (const KeyWrite& write : writes) {
      EXPECT_GE(write.first_slot, 0);
      EXPECT_GE(write.num_tokens, 1);
      EXPECT_LE(write.first_slot + write.num_tokens, kBlockSize)
          << "a write must stay inside one page";
      std::vector<uint8_t>& page = PageBuffer(write.layer_index, write.page);
      std::memcpy(page.data() + write.first_slot * token_bytes, write.keys,
                  write.num_tokens * token_bytes);
    }
    return absl::OkStatus();
  }

  absl::Status ReadKeys(absl::Span<const KeyRead> reads) override {
    const int64_t token_bytes = config_.TokenBytes();
    for (const KeyRead& read : reads) {
      std::vector<uint8_t>& page = PageBuffer(read.layer_index, read.page);
      std::memcpy(read.keys, page.data() + read.first_slot * token_bytes,
                  read.num_tokens * token_bytes);
    }
    return absl::OkStatus();
  }

  // The bytes of one slot, or empty if that page was never written.
  std::vector<uint8_t> Slot(int32_t layer_index, int32_t page, int64_t slot) const {
    auto it = pages_.find({layer_index, page});
    if (it == pages_.end()) return {};
    const int64_t token_bytes = config_.TokenBytes();
    const uint8_t* begin = it->second.data() + slot * token_bytes;
    return std::vector<uint8_t>(begin, begin + token_bytes);
  }

  int write_calls() const { return write_calls_; }

 private:
  std::vector<uint8_t>& PageBuffer(int32_t layer_index, int32_t page) {
    std::vector<uint8_t>& buffer = pages_[{layer_index, page}];
    if (buffer.empty()) buffer.assign(config_.LayerPageBytes(), 0);
    return buffer;
  }

  const ModelConfig config_;
  std::map<std::pair<int32_t, int32_t>, std::vector<uint8_t>> pages_;
  int write_calls_ = 0;
};

ModelConfig SmallModel() {
  ModelConfig model;
  model.num_layers = 4;
  model.first_sparse_layer = 1;  // three sparse layers: indices 0, 1, 2
  model.num_heads = 2;
  model.head_dim = 16;
  model.key_dtype = KeyDtype::kBf16;
  model.topk = 4;
  model.init_blocks = 1;
  model.local_blocks = 1;
  model.max_positions = 1024;
  return model;
}

// The bytes a test writes for (layer, token): a tag that tells every token
// of every layer and every generation apart, repeated over the token.
std::vector<uint8_t> TokenBytes(const ModelConfig& model, int32_t generation, int32_t layer_index,
                                int64_t token) {
  const uint32_t tag = static_cast<uint32_t>(generation) * 1000003u +
                       static_cast<uint32_t>(layer_index) * 10007u + static_cast<uint32_t>(token) +
                       1u;
  std::vector<uint8_t> bytes(model.TokenBytes());
  for (size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<uint8_t>(tag >> (8 * (i % 4)));
  }
  return bytes;
}

// Keys of a range, layer-major, built from TokenBytes. Owns the bytes that
// the KeyRange points at.
struct RangeKeys {
  std::vector<uint8_t> bytes;
  KeyRange range;
};

RangeKeys MakeRange(const ModelConfig& model, uint64_t sequence_id, int32_t first_layer_index,
                    int32_t num_layers, int64_t start_position, int64_t num_tokens,
                    int32_t generation = 0) {
  RangeKeys keys;
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      std::vector<uint8_t> token =
          TokenBytes(model, generation, first_layer_index + l, start_position + t);
      keys.bytes.insert(keys.bytes.end(), token.begin(), token.end());
    }
  }
  keys.range.sequence_id = sequence_id;
  keys.range.first_layer_index = first_layer_index;
  keys.range.num_layers = num_layers;
  keys.range.start_position = start_position;
  keys.range.num_tokens = num_tokens;
  keys.range.keys = keys.bytes.data();
  keys.range.keys_size = static_cast<int64_t>(keys.bytes.size());
  return keys;
}

class KeyCacheTest : public ::testing::Test {
 protected:
  static constexpr int64_t kPages = 8;
  static constexpr int64_t kMaxSequences = 4;

  KeyCacheTest()
      : model_(SmallModel()), store_(model_), cache_(model_, kPages, kMaxSequences, &store_) {}

  uint64_t OpenOrDie(uint64_t id = 0, absl::Duration lease = absl::Minutes(1)) {
    absl::StatusOr<uint64_t> opened = cache_.Open(id, lease, now_);
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? *opened : 0;
  }

  absl::Status Append(const RangeKeys& keys) { return cache_.Append({keys.range}, now_); }

  absl::Status Append(const std::vector<const RangeKeys*>& all) {
    std::vector<KeyRange> ranges;
    for (const RangeKeys* keys : all) ranges.push_back(keys->range);
    return cache_.Append(ranges, now_);
  }

  // Asserts that every token of keys sits at its page and slot.
  void ExpectStored(const RangeKeys& keys, int32_t generation = 0) {
    const Sequence* sequence = cache_.Find(keys.range.sequence_id);
    ASSERT_NE(sequence, nullptr);
    for (int32_t l = 0; l < keys.range.num_layers; ++l) {
      const int32_t layer = keys.range.first_layer_index + l;
      for (int64_t t = keys.range.start_position;
           t < keys.range.start_position + keys.range.num_tokens; ++t) {
        const size_t block = static_cast<size_t>(t / kBlockSize);
        ASSERT_LT(block, sequence->block_table.size());
        EXPECT_EQ(store_.Slot(layer, sequence->block_table[block], t % kBlockSize),
                  TokenBytes(model_, generation, layer, t))
            << "layer " << layer << " token " << t;
      }
    }
  }

  std::vector<int64_t> Fill(uint64_t id) const {
    const Sequence* sequence = cache_.Find(id);
    return sequence == nullptr ? std::vector<int64_t>{} : sequence->layer_fill;
  }
  std::vector<int32_t> Table(uint64_t id) const {
    const Sequence* sequence = cache_.Find(id);
    return sequence == nullptr ? std::vector<int32_t>{} : sequence->block_table;
  }

  const ModelConfig model_;
  InMemoryKeyStore store_;
  KeyCache cache_;
  absl::Time now_ = absl::FromUnixSeconds(1'700'000'000);
};

using Fills = std::vector<int64_t>;
using Pages = std::vector<int32_t>;

TEST_F(KeyCacheTest, ServerChosenIdsAreDistinctAndNonZero) {
  const uint64_t first = OpenOrDie();
  const uint64_t second = OpenOrDie();
  EXPECT_NE(first, 0u);
  EXPECT_NE(second, 0u);
  EXPECT_NE(first, second);
  EXPECT_NE(cache_.Find(first), nullptr);
  EXPECT_NE(cache_.Find(second), nullptr);
  EXPECT_EQ(cache_.stats().open_sequences, 2);
}

TEST_F(KeyCacheTest, OpensClientChosenIdAndServerSkipsIt) {
  // Take the id the server would pick next, so it has to skip it.
  ASSERT_EQ(OpenOrDie(1), 1u);
  const Sequence* sequence = cache_.Find(1);
  ASSERT_NE(sequence, nullptr);
  EXPECT_EQ(sequence->id, 1u);
  EXPECT_EQ(sequence->layer_fill, (Fills{0, 0, 0}));
  EXPECT_TRUE(sequence->block_table.empty());
  EXPECT_EQ(sequence->lease, absl::Minutes(1));
  EXPECT_EQ(sequence->last_used, now_);

  const uint64_t chosen = OpenOrDie();
  EXPECT_NE(chosen, 1u);
  EXPECT_NE(chosen, 0u);
}

TEST_F(KeyCacheTest, OpeningAnOpenIdIsAlreadyExistsAndKeepsTheSequence) {
  ASSERT_EQ(OpenOrDie(42), 42u);
  RangeKeys keys = MakeRange(model_, 42, 0, 1, 0, 10);
  ASSERT_TRUE(Append(keys).ok());

  absl::StatusOr<uint64_t> again = cache_.Open(42, absl::Minutes(5), now_);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(Fill(42), (Fills{10, 0, 0}));
  EXPECT_EQ(cache_.Find(42)->lease, absl::Minutes(1));
  EXPECT_EQ(cache_.stats().open_sequences, 1);
}

TEST_F(KeyCacheTest, OpeningPastMaxSequencesIsResourceExhausted) {
  for (int64_t i = 0; i < kMaxSequences; ++i) OpenOrDie();
  EXPECT_EQ(cache_.Open(0, absl::Minutes(1), now_).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache_.Open(999, absl::Minutes(1), now_).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache_.Find(999), nullptr);
  EXPECT_EQ(cache_.stats().open_sequences, kMaxSequences);

  // Releasing one makes room for one.
  ASSERT_TRUE(cache_.Release(1));
  EXPECT_EQ(OpenOrDie(999), 999u);
}

TEST_F(KeyCacheTest, ReleaseIsIdempotent) {
  const uint64_t id = OpenOrDie();
  EXPECT_TRUE(cache_.Release(id));
  EXPECT_EQ(cache_.Find(id), nullptr);
  EXPECT_FALSE(cache_.Release(id));
  EXPECT_FALSE(cache_.Release(12345));
  EXPECT_EQ(cache_.stats().open_sequences, 0);
}

TEST_F(KeyCacheTest, ReleasedPagesGoBackAndAnotherSequenceReusesThem) {
  const uint64_t first = OpenOrDie();
  RangeKeys first_keys = MakeRange(model_, first, 0, 3, 0, 2 * kBlockSize + 1);
  ASSERT_TRUE(Append(first_keys).ok());
  const Pages first_pages = Table(first);
  ASSERT_EQ(first_pages.size(), 3u);
  EXPECT_EQ(cache_.stats().free_pages, kPages - 3);

  ASSERT_TRUE(cache_.Release(first));
  EXPECT_EQ(cache_.stats().free_pages, kPages);

  const uint64_t second = OpenOrDie();
  EXPECT_EQ(Fill(second), (Fills{0, 0, 0})) << "a new sequence starts empty";
  RangeKeys second_keys = MakeRange(model_, second, 0, 3, 0, 2 * kBlockSize + 1, /*generation=*/1);
  ASSERT_TRUE(Append(second_keys).ok());
  // The pool is LIFO, so the pages just freed are the ones handed out again.
  EXPECT_EQ(Table(second), first_pages);
  ExpectStored(second_keys, /*generation=*/1);
  EXPECT_EQ(cache_.stats().free_pages, kPages - 3);
}

TEST_F(KeyCacheTest, AppendWritesEveryTokenAtItsPageAndSlot) {
  const uint64_t id = OpenOrDie();
  // Two layers (sparse indices 1 and 2), crossing a page boundary.
  RangeKeys keys = MakeRange(model_, id, 1, 2, 0, kBlockSize + 72);
  ASSERT_TRUE(Append(keys).ok());
  EXPECT_EQ(Table(id), (Pages{0, 1}));
  EXPECT_EQ(Fill(id), (Fills{0, kBlockSize + 72, kBlockSize + 72}));
  EXPECT_EQ(cache_.stats().free_pages, kPages - 2);
  ExpectStored(keys);
  // Layer 0 was not part of the range and got nothing.
  EXPECT_TRUE(store_.Slot(0, 0, 0).empty());
}

TEST_F(KeyCacheTest, ConsecutiveAppendsContinueInTheSamePage) {
  const uint64_t id = OpenOrDie();
  RangeKeys head = MakeRange(model_, id, 0, 1, 0, 100);
  RangeKeys tail = MakeRange(model_, id, 0, 1, 100, 60);
  ASSERT_TRUE(Append(head).ok());
  EXPECT_EQ(Table(id), (Pages{0}));
  ASSERT_TRUE(Append(tail).ok());
  EXPECT_EQ(Table(id), (Pages{0, 1}));
  EXPECT_EQ(Fill(id), (Fills{160, 0, 0}));
  ExpectStored(head);
  ExpectStored(tail);
}

TEST_F(KeyCacheTest, RangesOfOneRequestApplyInOrder) {
  const uint64_t id = OpenOrDie();
  // The second range starts where the first ends: valid only because the
  // first is counted before the second is checked.
  RangeKeys first = MakeRange(model_, id, 0, 1, 0, 100);
  RangeKeys second = MakeRange(model_, id, 0, 1, 100, 100);
  ASSERT_TRUE(Append({&first, &second}).ok());
  EXPECT_EQ(Fill(id), (Fills{200, 0, 0}));
  EXPECT_EQ(Table(id).size(), 2u);
  EXPECT_EQ(cache_.stats().free_pages, kPages - 2);
  ExpectStored(first);
  ExpectStored(second);
}

TEST_F(KeyCacheTest, InvalidLayersAreInvalidArgument) {
  const uint64_t id = OpenOrDie();
  RangeKeys negative = MakeRange(model_, id, 0, 1, 0, 4);
  negative.range.first_layer_index = -1;
  RangeKeys no_layers = MakeRange(model_, id, 0, 1, 0, 4);
  no_layers.range.num_layers = 0;
  RangeKeys past_last = MakeRange(model_, id, 2, 2, 0, 4);  // indices 2, 3
  RangeKeys first_past_last = MakeRange(model_, id, 3, 1, 0, 4);
  for (const RangeKeys* keys : {&negative, &no_layers, &past_last, &first_past_last}) {
    EXPECT_EQ(Append(*keys).code(), absl::StatusCode::kInvalidArgument)
        << "first " << keys->range.first_layer_index << " count " << keys->range.num_layers;
  }
  EXPECT_EQ(Fill(id), (Fills{0, 0, 0}));
  EXPECT_EQ(store_.write_calls(), 0);
}

TEST_F(KeyCacheTest, InvalidTokenCountsAndSizesAreInvalidArgument) {
  const uint64_t id = OpenOrDie();
  RangeKeys no_tokens = MakeRange(model_, id, 0, 1, 0, 4);
  no_tokens.range.num_tokens = 0;
  RangeKeys too_few_bytes = MakeRange(model_, id, 0, 1, 0, 4);
  too_few_bytes.range.keys_size -= 1;
  RangeKeys too_many_bytes = MakeRange(model_, id, 0, 1, 0, 4);
  too_many_bytes.bytes.resize(too_many_bytes.bytes.size() + model_.TokenBytes());
  too_many_bytes.range.keys = too_many_bytes.bytes.data();
  too_many_bytes.range.keys_size = static_cast<int64_t>(too_many_bytes.bytes.size());
  RangeKeys one_layer_of_two = MakeRange(model_, id, 0, 1, 0, 4);
  one_layer_of_two.range.num_layers = 2;
  RangeKeys no_pointer = MakeRange(model_, id, 0, 1, 0, 4);
  no_pointer.range.keys = nullptr;
  for (const RangeKeys* keys :
       {&no_tokens, &too_few_bytes, &too_many_bytes, &one_layer_of_two, &no_pointer}) {
    EXPECT_EQ(Append(*keys).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(Fill(id), (Fills{0, 0, 0}));
  EXPECT_TRUE(Table(id).empty());
  EXPECT_EQ(store_.write_calls(), 0);
}

TEST_F(KeyCacheTest, PositionsPastMaxPositionsAreInvalidArgument) {
  const uint64_t id = OpenOrDie();
  // Fill the layer right up to max_positions so only the limit can refuse.
  RangeKeys full = MakeRange(model_, id, 0, 1, 0, model_.max_positions);
  ASSERT_TRUE(Append(full).ok());
  EXPECT_EQ(Fill(id), (Fills{model_.max_positions, 0, 0}));

  RangeKeys one_past = MakeRange(model_, id, 0, 1, model_.max_positions - 3, 4);
  EXPECT_EQ(Append(one_past).code(), absl::StatusCode::kInvalidArgument);
  RangeKeys starts_past = MakeRange(model_, id, 0, 1, model_.max_positions, 1);
  EXPECT_EQ(Append(starts_past).code(), absl::StatusCode::kInvalidArgument);
  RangeKeys negative = MakeRange(model_, id, 0, 1, 0, 1);
  negative.range.start_position = -1;
  EXPECT_EQ(Append(negative).code(), absl::StatusCode::kInvalidArgument);
  // Ending exactly at the limit is fine.
  RangeKeys last = MakeRange(model_, id, 0, 1, model_.max_positions - 1, 1, 1);
  EXPECT_TRUE(Append(last).ok());
  EXPECT_EQ(Fill(id), (Fills{model_.max_positions, 0, 0}));
}

TEST_F(KeyCacheTest, UnknownSequenceIsNotFound) {
  RangeKeys keys = MakeRange(model_, 77, 0, 1, 0, 4);
  EXPECT_EQ(Append(keys).code(), absl::StatusCode::kNotFound);
  const uint64_t id = OpenOrDie();
  ASSERT_TRUE(cache_.Release(id));
  RangeKeys released = MakeRange(model_, id, 0, 1, 0, 4);
  EXPECT_EQ(Append(released).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_.stats().free_pages, kPages);
  EXPECT_EQ(store_.write_calls(), 0);
}

TEST_F(KeyCacheTest, StartingPastTheFillIsFailedPrecondition) {
  const uint64_t id = OpenOrDie();
  RangeKeys gap_on_empty = MakeRange(model_, id, 0, 1, 1, 4);
  EXPECT_EQ(Append(gap_on_empty).code(), absl::StatusCode::kFailedPrecondition);

  RangeKeys head = MakeRange(model_, id, 0, 1, 0, 10);
  ASSERT_TRUE(Append(head).ok());
  RangeKeys gap = MakeRange(model_, id, 0, 1, 11, 4);
  EXPECT_EQ(Append(gap).code(), absl::StatusCode::kFailedPrecondition);
  // A gap inside the request counts too: the second range skips a token
  // past the first one's end.
  RangeKeys next = MakeRange(model_, id, 0, 1, 10, 5);
  RangeKeys skips = MakeRange(model_, id, 0, 1, 16, 5);
  EXPECT_EQ(Append({&next, &skips}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Fill(id), (Fills{10, 0, 0}));
}

TEST_F(KeyCacheTest, ARequestWithOneBadRangeChangesNothing) {
  const uint64_t a = OpenOrDie();
  const uint64_t b = OpenOrDie();
  RangeKeys a_head = MakeRange(model_, a, 0, 3, 0, 50);
  ASSERT_TRUE(Append(a_head).ok());
  const int writes_before = store_.write_calls();
  const Pages a_table = Table(a);
  const int64_t free_before = cache_.stats().free_pages;

  // Good ranges that would grow both sequences by pages, then a bad one.
  RangeKeys a_more = MakeRange(model_, a, 0, 3, 50, 300, 1);
  RangeKeys b_new = MakeRange(model_, b, 1, 1, 0, 200, 1);
  RangeKeys bad_layer = MakeRange(model_, b, 2, 2, 0, 4, 1);
  RangeKeys bad_sequence = MakeRange(model_, 999, 0, 1, 0, 4, 1);
  RangeKeys bad_gap = MakeRange(model_, b, 0, 1, 5, 4, 1);
  for (const RangeKeys* bad : {&bad_layer, &bad_sequence, &bad_gap}) {
    EXPECT_FALSE(Append({&a_more, &b_new, bad}).ok());
    EXPECT_EQ(Fill(a), (Fills{50, 50, 50}));
    EXPECT_EQ(Fill(b), (Fills{0, 0, 0}));
    EXPECT_EQ(Table(a), a_table);
    EXPECT_TRUE(Table(b).empty());
    EXPECT_EQ(cache_.stats().free_pages, free_before);
    EXPECT_EQ(store_.write_calls(), writes_before);
  }
  ExpectStored(a_head);
}

TEST_F(KeyCacheTest, FullPoolIsResourceExhaustedAndOtherSequencesAreUnaffected) {
  const uint64_t a = OpenOrDie();
  const uint64_t b = OpenOrDie();
  RangeKeys a_keys = MakeRange(model_, a, 0, 3, 0, 5 * kBlockSize);  // 5 pages
  ASSERT_TRUE(Append(a_keys).ok());
  RangeKeys b_head = MakeRange(model_, b, 0, 1, 0, 10);  // 1 page
  ASSERT_TRUE(Append(b_head).ok());
  ASSERT_EQ(cache_.stats().free_pages, 2);
  const int writes_before = store_.write_calls();

  // b would need 3 more pages; 2 are free.
  RangeKeys b_too_much = MakeRange(model_, b, 0, 1, 10, 4 * kBlockSize - 10, 1);
  EXPECT_EQ(Append(b_too_much).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache_.stats().free_pages, 2);
  EXPECT_EQ(Fill(b), (Fills{10, 0, 0}));
  EXPECT_EQ(Table(b).size(), 1u);
  EXPECT_EQ(store_.write_calls(), writes_before);

  // a is intact and keeps working, and b can still use what is free.
  EXPECT_EQ(Fill(a), (Fills{5 * kBlockSize, 5 * kBlockSize, 5 * kBlockSize}));
  ExpectStored(a_keys);
  ExpectStored(b_head);
  RangeKeys b_fits = MakeRange(model_, b, 0, 1, 10, 3 * kBlockSize - 10, 1);
  ASSERT_TRUE(Append(b_fits).ok());
  EXPECT_EQ(cache_.stats().free_pages, 0);
  ExpectStored(b_fits, 1);
  ExpectStored(a_keys);
  // Rewriting inside pages a already holds needs no new page.
  RangeKeys a_rewrite = MakeRange(model_, a, 1, 1, 0, 3 * kBlockSize, 2);
  EXPECT_TRUE(Append(a_rewrite).ok());
}

TEST_F(KeyCacheTest, RewritingATailSetsTheFillToItsEnd) {
  const uint64_t id = OpenOrDie();
  RangeKeys head = MakeRange(model_, id, 0, 1, 0, 150);
  ASSERT_TRUE(Append(head).ok());
  ASSERT_EQ(Table(id).size(), 2u);

  // A rejected speculative draft: rewrite 140.. with fewer tokens.
  RangeKeys rewrite = MakeRange(model_, id, 0, 1, 140, 5, 1);
  ASSERT_TRUE(Append(rewrite).ok());
  EXPECT_EQ(Fill(id), (Fills{145, 0, 0}));
  EXPECT_EQ(Table(id).size(), 2u) << "pages are kept for the tokens to come";
  EXPECT_EQ(cache_.stats().free_pages, kPages - 2);
  ExpectStored(rewrite, 1);
  RangeKeys untouched = MakeRange(model_, id, 0, 1, 0, 140);
  ExpectStored(untouched);

  // The next append must start at or before the new fill.
  RangeKeys gap = MakeRange(model_, id, 0, 1, 146, 1, 2);
  EXPECT_EQ(Append(gap).code(), absl::StatusCode::kFailedPrecondition);
  RangeKeys at_fill = MakeRange(model_, id, 0, 1, 145, 1, 2);
  EXPECT_TRUE(Append(at_fill).ok());
  EXPECT_EQ(Fill(id), (Fills{146, 0, 0}));

  // Rewriting from position 0 is allowed too.
  RangeKeys from_start = MakeRange(model_, id, 0, 1, 0, 3, 3);
  ASSERT_TRUE(Append(from_start).ok());
  EXPECT_EQ(Fill(id), (Fills{3, 0, 0}));
  ExpectStored(from_start, 3);
}

TEST_F(KeyCacheTest, OneBlockTableServesEveryLayer) {
  const uint64_t id = OpenOrDie();
  RangeKeys layer0 = MakeRange(model_, id, 0, 1, 0, 200);
  ASSERT_TRUE(Append(layer0).ok());
  const Pages table = Table(id);
  ASSERT_EQ(table.size(), 2u);

  // Another layer over the same positions takes no new page.
  RangeKeys layer2 = MakeRange(model_, id, 2, 1, 0, 200);
  ASSERT_TRUE(Append(layer2).ok());
  EXPECT_EQ(Table(id), table);
  EXPECT_EQ(cache_.stats().free_pages, kPages - 2);
  ExpectStored(layer0);
  ExpectStored(layer2);

  // Going further in any layer extends the one table.
  RangeKeys layer1 = MakeRange(model_, id, 1, 1, 0, 300);
  ASSERT_TRUE(Append(layer1).ok());
  const Pages grown = Table(id);
  ASSERT_EQ(grown.size(), 3u);
  EXPECT_EQ(Pages(grown.begin(), grown.begin() + 2), table);
  EXPECT_EQ(cache_.stats().free_pages, kPages - 3);
  ExpectStored(layer1);
}

TEST_F(KeyCacheTest, FillIsTrackedPerLayer) {
  const uint64_t id = OpenOrDie();
  RangeKeys layer0 = MakeRange(model_, id, 0, 1, 0, 100);
  RangeKeys layer1 = MakeRange(model_, id, 1, 1, 0, 30);
  ASSERT_TRUE(Append({&layer0, &layer1}).ok());
  EXPECT_EQ(Fill(id), (Fills{100, 30, 0}));

  // Layer 1 holds 30 tokens: appending at 100 there is a gap although
  // layer 0 holds 100.
  RangeKeys layer1_gap = MakeRange(model_, id, 1, 1, 100, 1);
  EXPECT_EQ(Append(layer1_gap).code(), absl::StatusCode::kFailedPrecondition);
  // A range over layers 0 and 1 must fit both fills.
  RangeKeys both_at_100 = MakeRange(model_, id, 0, 2, 100, 1);
  EXPECT_EQ(Append(both_at_100).code(), absl::StatusCode::kFailedPrecondition);
  RangeKeys both_at_30 = MakeRange(model_, id, 0, 2, 30, 10, 1);
  ASSERT_TRUE(Append(both_at_30).ok());
  EXPECT_EQ(Fill(id), (Fills{40, 40, 0}));
}

TEST_F(KeyCacheTest, ReleaseExpiredReleasesOnlyExpiredSequences) {
  const absl::Time start = now_;
  const uint64_t short_lease = OpenOrDie(0, absl::Seconds(10));
  const uint64_t long_lease = OpenOrDie(0, absl::Seconds(60));
  RangeKeys keys = MakeRange(model_, short_lease, 0, 1, 0, 10);
  ASSERT_TRUE(Append(keys).ok());
  ASSERT_EQ(cache_.stats().free_pages, kPages - 1);

  // A lease runs out after, not at, last use + lease.
  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(10)), 0);
  EXPECT_EQ(cache_.stats().open_sequences, 2);

  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(11)), 1);
  EXPECT_EQ(cache_.Find(short_lease), nullptr);
  EXPECT_NE(cache_.Find(long_lease), nullptr);
  EXPECT_EQ(cache_.stats().free_pages, kPages) << "expired pages go back";

  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(61)), 1);
  EXPECT_EQ(cache_.stats().open_sequences, 0);
  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Hours(1)), 0);
}

TEST_F(KeyCacheTest, TouchAppendAndRenewExtendTheLease) {
  const absl::Time start = now_;
  const uint64_t touched = OpenOrDie(0, absl::Seconds(10));
  const uint64_t appended = OpenOrDie(0, absl::Seconds(10));
  const uint64_t renewed = OpenOrDie(0, absl::Seconds(10));
  const uint64_t idle = OpenOrDie(0, absl::Seconds(10));

  now_ = start + absl::Seconds(8);
  cache_.Touch(touched, now_);
  RangeKeys keys = MakeRange(model_, appended, 0, 1, 0, 4);
  ASSERT_TRUE(Append(keys).ok());
  const uint64_t renew_ids[] = {renewed};
  ASSERT_TRUE(cache_.Renew(renew_ids, now_).ok());
  EXPECT_EQ(cache_.Find(renewed)->last_used, now_);

  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(15)), 1);
  EXPECT_EQ(cache_.Find(idle), nullptr);
  EXPECT_NE(cache_.Find(touched), nullptr);
  EXPECT_NE(cache_.Find(appended), nullptr);
  EXPECT_NE(cache_.Find(renewed), nullptr);

  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(19)), 3);
  EXPECT_EQ(cache_.stats().open_sequences, 0);
}

TEST_F(KeyCacheTest, TouchOfAnUnknownIdDoesNothing) {
  const uint64_t id = OpenOrDie();
  cache_.Touch(id + 100, now_ + absl::Seconds(5));
  EXPECT_EQ(cache_.Find(id + 100), nullptr);
  EXPECT_EQ(cache_.stats().open_sequences, 1);
}

TEST_F(KeyCacheTest, RenewOfAnUnknownIdIsNotFoundAndRenewsNothing) {
  const absl::Time start = now_;
  const uint64_t known = OpenOrDie(0, absl::Seconds(10));
  const uint64_t ids[] = {known, 424242};
  EXPECT_EQ(cache_.Renew(ids, start + absl::Seconds(9)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_.Find(known)->last_used, start);
  // Not renewed, so it expires on its original schedule.
  EXPECT_EQ(cache_.ReleaseExpired(start + absl::Seconds(11)), 1);
  EXPECT_EQ(cache_.Find(known), nullptr);
}

TEST_F(KeyCacheTest, StatsCountPagesAndSequences) {
  CacheStats empty = cache_.stats();
  EXPECT_EQ(empty.total_pages, kPages);
  EXPECT_EQ(empty.free_pages, kPages);
  EXPECT_EQ(empty.open_sequences, 0);

  const uint64_t a = OpenOrDie();
  OpenOrDie();
  RangeKeys keys = MakeRange(model_, a, 0, 1, 0, kBlockSize + 1);
  ASSERT_TRUE(Append(keys).ok());
  CacheStats used = cache_.stats();
  EXPECT_EQ(used.total_pages, kPages);
  EXPECT_EQ(used.free_pages, kPages - 2);
  EXPECT_EQ(used.open_sequences, 2);
}

}  // namespace
}  // namespace blocksel
