// The co-located slot protocol against a region in host memory: the layout,
// sequences and their wrap-around, flow control, in-order hand-out, status
// words, and what a worker that breaks the protocol gets. Needs no GPU.
#include "colocated/slot_protocol.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "colocated/slot_region.h"
#include "colocated/slot_request.h"
#include "gtest/gtest.h"

namespace blocksel::colocated {
namespace {

constexpr int64_t kUnlimited = int64_t{1} << 40;

RegionSizes Sizes(uint32_t slots) {
  RegionSizes sizes;
  sizes.slot_count = slots;
  sizes.query_bytes = 1000;
  sizes.key_bytes = 0;
  sizes.metadata_bytes = 100;
  sizes.ids_bytes = 512;
  return sizes;
}

// A worker's view and the server's view of one region, both in host memory.
struct Region {
  explicit Region(uint32_t slots, uint32_t first_sequence = 0)
      : controls(new SlotControl[slots]),
        sequencer(slots, first_sequence),
        scanner(slots, first_sequence) {
    InitializeControls(controls.get(), slots, first_sequence);
  }

  // The worker: rings the next slot, which the protocol must have freed.
  SlotSequencer::Request Ring() {
    const SlotSequencer::Request request = sequencer.Next();
    EXPECT_EQ(controls[request.slot].completion, request.free_when)
        << "slot " << request.slot << " is still in flight";
    controls[request.slot].doorbell = request.sequence;
    return request;
  }

  std::unique_ptr<SlotControl[]> controls;
  SlotSequencer sequencer;
  DoorbellScanner scanner;
};

TEST(RegionLayout, PlacesEveryPartAlignedAndInsideItsMemory) {
  const absl::StatusOr<RegionLayout> layout = RegionLayoutFor(Sizes(4), kUnlimited);
  ASSERT_TRUE(layout.ok()) << layout.status();
  // Host part: header (64 bytes, padded to the controls' 128-byte alignment),
  // 4 controls of 384 bytes, then the metadata.
  EXPECT_EQ(layout->controls_offset, 128);
  EXPECT_EQ(layout->controls_offset % static_cast<int64_t>(alignof(SlotControl)), 0);
  EXPECT_EQ(layout->metadata_offset, 1792);  // 128 + 4 * 384 = 1664, aligned
  EXPECT_EQ(layout->metadata_stride, 256);   // 100 bytes, aligned
  EXPECT_EQ(layout->host_bytes, 1792 + 4 * 256);
  EXPECT_EQ(layout->MetadataOffset(3) + layout->metadata_stride, layout->host_bytes);
  // Device part: queries, no keys, ids.
  EXPECT_EQ(layout->query_offset, 0);
  EXPECT_EQ(layout->key_offset, 1024);  // 1000 query bytes, aligned
  EXPECT_EQ(layout->ids_offset, 1024);  // no keys
  EXPECT_EQ(layout->slot_stride, 1536);
  EXPECT_EQ(layout->device_bytes, 4 * 1536);
  EXPECT_EQ(layout->PayloadOffset(3) + layout->slot_stride, layout->device_bytes);
}

TEST(RegionLayout, RefusesBadSizesWithTheLimitAndTheFix) {
  absl::StatusOr<RegionLayout> layout = RegionLayoutFor(Sizes(3), kUnlimited);
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(layout.status().message(),
            "slot_count 3 is not a power of two in [1, 1024]; ask for 1, 2, 4, ... slots");
  EXPECT_EQ(RegionLayoutFor(Sizes(0), kUnlimited).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RegionLayoutFor(Sizes(2048), kUnlimited).status().code(),
            absl::StatusCode::kInvalidArgument);
  RegionSizes no_ids = Sizes(2);
  no_ids.ids_bytes = 0;
  EXPECT_EQ(RegionLayoutFor(no_ids, kUnlimited).status().message(),
            "a slot needs room for queries, metadata and block ids (query_bytes 1000, "
            "metadata_bytes 100, ids_bytes 0); size them for the largest batch");
  layout = RegionLayoutFor(Sizes(4), 4096);
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(layout.status().message(),
            "a region of 4 slots of 1536 bytes needs 6144 bytes of GPU memory, above the "
            "server's 4096 per attachment; ask for fewer or smaller slots");
}

TEST(SlotRequest, SizesASlotForTheLargestBatch) {
  // M3's indexer: H=64, D=128, bf16 keys (256 bytes a token), topk 16.
  const SlotModel model{64, 128, 256, 16};
  const RegionSizes sizes = SlotSizesFor(model, 4, /*max_requests=*/8, /*tokens=*/2, true);
  EXPECT_EQ(sizes.slot_count, 4u);
  EXPECT_EQ(sizes.query_bytes, 16u * 64 * 128 * 2);  // 16 rows
  EXPECT_EQ(sizes.key_bytes, 16u * 256);
  EXPECT_EQ(sizes.metadata_bytes, sizeof(SlotBatchHeader) + 8 * sizeof(SlotDecodeRequest));
  EXPECT_EQ(sizes.ids_bytes, 64u * 16 * 16 * 4);
  EXPECT_EQ(SlotSizesFor(model, 4, 8, 2, /*with_keys=*/false).key_bytes, 0u);
  // Past 32 bits a size saturates, and the region limit refuses it.
  const RegionSizes huge = SlotSizesFor(model, 1, 1u << 20, 64, false);
  EXPECT_EQ(huge.query_bytes, UINT32_MAX);
  EXPECT_EQ(RegionLayoutFor(huge, int64_t{256} << 20).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(SlotProtocol, ANewRegionIsIdle) {
  Region region(4);
  EXPECT_TRUE(region.scanner.Scan(region.controls.get()).empty());
  for (uint32_t slot = 0; slot < 4; ++slot) {
    EXPECT_EQ(region.controls[slot].doorbell, region.controls[slot].completion);
    EXPECT_EQ(region.controls[slot].doorbell, InitialWord(slot, 4));
  }
}

TEST(SlotProtocol, HandsOutRequestsInOrderOnceEach) {
  Region region(4);
  for (int i = 0; i < 3; ++i) region.Ring();
  const std::vector<DoorbellScanner::Rung> rung = region.scanner.Scan(region.controls.get());
  ASSERT_EQ(rung.size(), 3u);
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(rung[i].sequence, i);
    EXPECT_EQ(rung[i].slot, i);
    EXPECT_TRUE(rung[i].violation.ok());
  }
  // Handed out: not again, answered or not.
  EXPECT_TRUE(region.scanner.Scan(region.controls.get()).empty());
  region.Ring();
  const std::vector<DoorbellScanner::Rung> fourth = region.scanner.Scan(region.controls.get());
  ASSERT_EQ(fourth.size(), 1u);
  EXPECT_EQ(fourth[0].sequence, 3u);
}

TEST(SlotProtocol, ALaterSlotWaitsForTheEarlierSequence) {
  Region region(4);
  const SlotSequencer::Request first = region.sequencer.Next();
  const SlotSequencer::Request second = region.sequencer.Next();
  // The second doorbell is seen before the first (the worker's two streams
  // rang them out of order): nothing is handed out until the first rings.
  region.controls[second.slot].doorbell = second.sequence;
  EXPECT_TRUE(region.scanner.Scan(region.controls.get()).empty());
  region.controls[first.slot].doorbell = first.sequence;
  const std::vector<DoorbellScanner::Rung> rung = region.scanner.Scan(region.controls.get());
  ASSERT_EQ(rung.size(), 2u);
  EXPECT_EQ(rung[0].sequence, first.sequence);
  EXPECT_EQ(rung[1].sequence, second.sequence);
}

TEST(SlotProtocol, SlotsAreReusedAcrossTheWrapOfTheSequence) {
  // Start 6 requests before 2^32: the ring wraps the 32-bit words midway.
  const uint32_t first = 0xFFFFFFFAu;
  Region region(4, first);
  for (uint32_t n = 0; n < 20; ++n) {
    const SlotSequencer::Request request = region.Ring();
    EXPECT_EQ(request.sequence, first + n);
    EXPECT_EQ(request.slot, (first + n) % 4);
    const std::vector<DoorbellScanner::Rung> rung = region.scanner.Scan(region.controls.get());
    ASSERT_EQ(rung.size(), 1u) << "request " << n;
    EXPECT_EQ(rung[0].sequence, request.sequence);
    EXPECT_TRUE(rung[0].violation.ok()) << rung[0].violation;
    WriteAnswer(&region.controls[rung[0].slot], rung[0].sequence, absl::OkStatus());
    region.scanner.Answered(rung[0].slot, rung[0].sequence);
    const std::optional<absl::Status> answer =
        ReadAnswer(region.controls[request.slot], request.sequence);
    ASSERT_TRUE(answer.has_value());
    EXPECT_TRUE(answer->ok());
  }
}

TEST(SlotProtocol, AFullRingMakesTheWorkerWait) {
  Region region(2);
  region.Ring();
  region.Ring();
  const std::vector<DoorbellScanner::Rung> rung = region.scanner.Scan(region.controls.get());
  ASSERT_EQ(rung.size(), 2u);
  // The third request maps to slot 0, which is free only once request 0
  // is answered.
  const SlotSequencer::Request third = region.sequencer.Next();
  EXPECT_EQ(third.slot, 0u);
  EXPECT_NE(region.controls[0].completion, third.free_when);
  WriteAnswer(&region.controls[0], 0, absl::OkStatus());
  region.scanner.Answered(0, 0);
  EXPECT_EQ(region.controls[0].completion, third.free_when);
}

TEST(SlotProtocol, StatusWordsCarryTheCodeAndTheMessage) {
  Region region(1);
  region.Ring();
  ASSERT_EQ(region.scanner.Scan(region.controls.get()).size(), 1u);
  EXPECT_FALSE(ReadAnswer(region.controls[0], 0).has_value()) << "answered before the server";
  EXPECT_EQ(region.controls[0].answer_flag, 0u);
  WriteAnswer(&region.controls[0], 0, absl::NotFoundError("sequence 7 is not open"));
  EXPECT_EQ(region.controls[0].answer_flag, 1u);  // what a worker's stream waits on
  const std::optional<absl::Status> answer = ReadAnswer(region.controls[0], 0);
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(*answer, absl::NotFoundError("sequence 7 is not open"));
  // A message longer than the slot holds arrives cut, never overrunning.
  region.scanner.Answered(0, 0);
  region.Ring();
  ASSERT_EQ(region.scanner.Scan(region.controls.get()).size(), 1u);
  const std::string long_message(1000, 'x');
  WriteAnswer(&region.controls[0], 1, absl::InvalidArgumentError(long_message));
  const std::optional<absl::Status> cut = ReadAnswer(region.controls[0], 1);
  ASSERT_TRUE(cut.has_value());
  EXPECT_EQ(cut->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cut->message(), std::string(kMessageBytes, 'x'));
  // The completion word of a later sequence is not this answer.
  EXPECT_FALSE(ReadAnswer(region.controls[0], 2).has_value());
}

TEST(SlotProtocol, AWrongDoorbellGetsAnErrorAndBreaksOnlyItsAttachment) {
  Region broken(4);
  Region healthy(4);
  broken.controls[2].doorbell = 77;  // neither idle nor slot 2's next request
  healthy.Ring();
  std::vector<DoorbellScanner::Rung> rung = broken.scanner.Scan(broken.controls.get());
  ASSERT_EQ(rung.size(), 1u);
  EXPECT_EQ(rung[0].slot, 2u);
  EXPECT_EQ(rung[0].sequence, 77u);
  EXPECT_EQ(rung[0].violation,
            absl::InvalidArgumentError("slot 2 doorbell holds sequence 77, expected 2 (the "
                                       "slot's next request) or 4294967294 (no request); ring "
                                       "each slot with the sequence SlotSequencer gives"));
  // The server answers it, which ends the worker's wait for that word.
  WriteAnswer(&broken.controls[2], 77, rung[0].violation);
  broken.scanner.Answered(2, 77);
  EXPECT_EQ(ReadAnswer(broken.controls[2], 77)->code(), absl::StatusCode::kInvalidArgument);
  // From then on every doorbell of that attachment is answered with an
  // error, valid or not, so no wait hangs and nothing more is served.
  broken.Ring();
  rung = broken.scanner.Scan(broken.controls.get());
  ASSERT_EQ(rung.size(), 1u);
  EXPECT_EQ(rung[0].violation.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(rung[0].violation.message().find("detach and attach again"), std::string::npos);
  // Another attachment's region and scanner are untouched.
  const std::vector<DoorbellScanner::Rung> other = healthy.scanner.Scan(healthy.controls.get());
  ASSERT_EQ(other.size(), 1u);
  EXPECT_TRUE(other[0].violation.ok());
}

TEST(SlotProtocol, AWorkerRewritingACompletionWordCannotReplayARequest) {
  Region region(2);
  region.Ring();
  ASSERT_EQ(region.scanner.Scan(region.controls.get()).size(), 1u);
  WriteAnswer(&region.controls[0], 0, absl::OkStatus());
  region.scanner.Answered(0, 0);
  // The worker puts the completion word back: the server keeps its own
  // record, so the answered doorbell is not served again.
  region.controls[0].completion = InitialWord(0, 2);
  EXPECT_TRUE(region.scanner.Scan(region.controls.get()).empty());
}

TEST(SlotProtocol, AnAnswerWrittenOnAnotherThreadIsSeenWhole) {
  // The completion word is released after the status: a reader that sees
  // the sequence sees the message written before it.
  for (int round = 0; round < 200; ++round) {
    Region region(1);
    region.Ring();
    ASSERT_EQ(region.scanner.Scan(region.controls.get()).size(), 1u);
    std::thread server([&] {
      WriteAnswer(&region.controls[0], 0, absl::ResourceExhaustedError("no pages left"));
    });
    std::optional<absl::Status> answer;
    while (!(answer = ReadAnswer(region.controls[0], 0)).has_value()) {
      std::this_thread::yield();
    }
    server.join();
    EXPECT_EQ(*answer, absl::ResourceExhaustedError("no pages left"));
  }
}

}  // namespace
}  // namespace blocksel::colocated
