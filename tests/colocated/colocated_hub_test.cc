// The server's side of the co-located data plane against host memory: what
// an attach creates and refuses, how rung slots with bad batches are
// answered, how a broken doorbell breaks only its attachment, and how
// detach, lease expiry and shutdown close a region. The engine runs the cpu
// backend, which refuses GPU payloads: a valid batch gets that refusal, so
// every answer here is written by the host. Selections that succeed run on
// the GPU machine (gpu_session_test).
#include "server/colocated/colocated_hub.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "colocated/shared_memory.h"
#include "colocated/slot_protocol.h"
#include "colocated/slot_region.h"
#include "colocated/slot_request.h"
#include "gtest/gtest.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"
#include "server/engine/select_batcher.h"
#include "tests/support/test_model.h"

namespace blocksel {
namespace {

constexpr char kBusId[] = "0000:17:00.0";

// A region device in host memory: the payloads are plain allocations and
// the host part is reached at its own address.
class HostRegionDevice final : public RegionDevice {
 public:
  explicit HostRegionDevice(int* live_buffers) : live_buffers_(live_buffers) {}
  const std::string& pci_bus_id() const override { return bus_id_; }
  absl::StatusOr<Buffer> Allocate(int64_t bytes) override {
    ++*live_buffers_;
    return Buffer{new unsigned char[bytes](), "host"};
  }
  void Free(void* address) override {
    --*live_buffers_;
    delete[] static_cast<unsigned char*>(address);
  }
  absl::StatusOr<void*> MapHost(void* host, int64_t /*bytes*/) override { return host; }
  void UnmapHost(void* /*host*/) override {}

 private:
  const std::string bus_id_ = kBusId;
  int* live_buffers_;
};

class ColocatedHubTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::SmallTestModel();
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
        CpuBackend::Create(model_, /*num_pages=*/16, /*num_threads=*/1);
    ASSERT_TRUE(backend.ok()) << backend.status();
    EngineOptions engine_options;
    engine_options.model = model_;
    engine_options.num_pages = 16;
    engine_ = std::make_unique<Engine>(engine_options, std::move(*backend));
    Executor::Options executor_options;
    Engine* engine = engine_.get();
    executor_options.poll = [engine] { return engine->FinishSelections(/*wait=*/false); };
    executor_ = std::make_unique<Executor>(std::move(executor_options));
    batcher_ = std::make_unique<SelectBatcher>(engine, executor_.get(), SelectBatcher::Options{});
    ColocatedOptions options;
    options.max_attachments = 2;
    options.max_region_bytes = int64_t{1} << 20;
    options.clock = [this] { return now_; };
    hub_ = std::make_unique<ColocatedHub>(
        model_, batcher_.get(), std::make_unique<HostRegionDevice>(&live_buffers_), "", options);
  }

  void TearDown() override {
    hub_->Shutdown();
    executor_->Stop();
    hub_.reset();
    EXPECT_EQ(live_buffers_, 0) << "a region's payloads were not freed";
  }

  v1::AttachRequest Request(uint32_t slots = 4) const {
    v1::AttachRequest request;
    request.set_pci_bus_id(kBusId);
    request.set_protocol_version(colocated::kProtocolVersion);
    request.set_slot_count(slots);
    request.set_max_requests(4);
    request.set_tokens_per_request(1);
    return request;
  }

  // The worker's side of an attachment, in this process.
  struct Worker {
    v1::AttachResponse attached;
    colocated::RegionLayout layout;
    std::unique_ptr<colocated::SharedMemory> host;
    colocated::SlotSequencer sequencer{1};

    colocated::SlotControl* control(uint32_t slot) const {
      return reinterpret_cast<colocated::SlotControl*>(host->data() + layout.ControlOffset(slot));
    }
    const colocated::RegionHeader& header() const {
      return *reinterpret_cast<const colocated::RegionHeader*>(host->data());
    }
    // Writes a batch into the next slot and rings it; returns its sequence.
    uint32_t Ring(const colocated::SlotBatchHeader& batch,
                  const std::vector<colocated::SlotDecodeRequest>& requests) {
      const colocated::SlotSequencer::Request next = sequencer.Next();
      unsigned char* metadata = host->data() + layout.MetadataOffset(next.slot);
      std::memcpy(metadata, &batch, sizeof(batch));
      if (!requests.empty()) {
        std::memcpy(metadata + sizeof(batch), requests.data(),
                    requests.size() * sizeof(colocated::SlotDecodeRequest));
      }
      // Released after the metadata, as the worker's post kernel does.
      colocated::StoreRelease(control(next.slot)->doorbell, next.sequence);
      return next.sequence;
    }
  };

  Worker Attach(uint32_t slots = 4) {
    Worker worker;
    absl::StatusOr<v1::AttachResponse> attached = hub_->Attach(Request(slots));
    EXPECT_TRUE(attached.ok()) << attached.status();
    if (!attached.ok()) return worker;
    worker.attached = *attached;
    colocated::RegionSizes sizes;
    sizes.slot_count = attached->slot_count();
    sizes.query_bytes = attached->query_bytes();
    sizes.key_bytes = attached->key_bytes();
    sizes.metadata_bytes = attached->metadata_bytes();
    sizes.ids_bytes = attached->ids_bytes();
    worker.layout = *colocated::RegionLayoutFor(sizes, int64_t{1} << 40);
    absl::StatusOr<std::unique_ptr<colocated::SharedMemory>> host =
        colocated::SharedMemory::Open(attached->shared_memory_name(), worker.layout.host_bytes);
    EXPECT_TRUE(host.ok()) << host.status();
    if (host.ok()) worker.host = std::move(*host);
    worker.sequencer = colocated::SlotSequencer(slots);
    return worker;
  }

  // Polls until the slot's answer to sequence arrives (the executor
  // answers asynchronously), or gives up after a few seconds.
  std::optional<absl::Status> Answer(const Worker& worker, uint32_t sequence) {
    const uint32_t slot = colocated::SlotOf(sequence, worker.layout.sizes.slot_count);
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    while (absl::Now() < give_up) {
      hub_->PollOnce();
      std::optional<absl::Status> answer = colocated::ReadAnswer(*worker.control(slot), sequence);
      if (answer.has_value()) return answer;
      absl::SleepFor(absl::Milliseconds(1));
    }
    return std::nullopt;
  }

  colocated::SlotBatchHeader Batch(uint32_t requests, uint32_t flags = 0) const {
    colocated::SlotBatchHeader batch;
    batch.request_id = 7;
    batch.layer = testing::kTestFirstSparseLayer;
    batch.num_requests = requests;
    batch.tokens_per_request = 1;
    batch.flags = flags;
    return batch;
  }

  ModelConfig model_;
  absl::Time now_ = absl::FromUnixSeconds(1000);
  int live_buffers_ = 0;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<SelectBatcher> batcher_;
  std::unique_ptr<ColocatedHub> hub_;
};

TEST_F(ColocatedHubTest, AnAttachCreatesAnIdleRegionSizedForTheModel) {
  Worker worker = Attach();
  ASSERT_NE(worker.host, nullptr);
  EXPECT_EQ(worker.header().magic, colocated::kRegionMagic);
  EXPECT_EQ(worker.header().state, colocated::kRegionServing);
  EXPECT_EQ(worker.header().server_epoch, worker.attached.server_epoch());
  const colocated::RegionSizes expected = colocated::SlotSizesFor(
      {2, 32, 64, 4}, /*slot_count=*/4, /*max_requests=*/4, /*tokens_per_request=*/1, false);
  EXPECT_EQ(worker.attached.query_bytes(), expected.query_bytes);
  EXPECT_EQ(worker.attached.ids_bytes(), expected.ids_bytes);
  EXPECT_EQ(worker.attached.metadata_bytes(), expected.metadata_bytes);
  EXPECT_EQ(worker.attached.lease_seconds(), 30u);
  EXPECT_EQ(worker.attached.pci_bus_id(), kBusId);
  for (uint32_t slot = 0; slot < 4; ++slot) {
    EXPECT_EQ(worker.control(slot)->doorbell, worker.control(slot)->completion);
  }
  EXPECT_EQ(hub_->PollOnce(), 0);
  EXPECT_EQ(live_buffers_, 1);
}

// A worker on another GPU of the host that reaches the server's over peer
// access gets a region, and learns which GPU its memory is on.
TEST_F(ColocatedHubTest, AnotherGpuWithPeerAccessIsAttachedAndToldTheServersGpu) {
  v1::AttachRequest request = Request();
  request.set_pci_bus_id("0000:99:00.0");
  request.set_peer_access(true);
  absl::StatusOr<v1::AttachResponse> attached = hub_->Attach(request);
  ASSERT_TRUE(attached.ok()) << attached.status();
  EXPECT_EQ(attached->pci_bus_id(), kBusId);
  EXPECT_EQ(hub_->attachments(), 1);
}

TEST_F(ColocatedHubTest, AttachRefusesAnotherGpuAVersionAndSizesWithTheFix) {
  v1::AttachRequest request = Request();
  request.set_pci_bus_id("0000:99:00.0");
  absl::StatusOr<v1::AttachResponse> attached = hub_->Attach(request);
  EXPECT_EQ(attached.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(attached.status().message(),
            "the worker's GPU is 0000:99:00.0 and the server's is 0000:17:00.0; run the worker "
            "on the server's GPU, attach with peer_access from a GPU of the same host that "
            "reaches the server's, or use the gRPC data plane");
  request = Request();
  request.set_protocol_version(colocated::kProtocolVersion + 1);
  EXPECT_EQ(hub_->Attach(request).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(hub_->Attach(Request(/*slots=*/3)).status().code(), absl::StatusCode::kInvalidArgument);
  request = Request();
  request.set_tokens_per_request(0);
  EXPECT_EQ(hub_->Attach(request).status().message(),
            "tokens_per_request must be in [1, 64], got 0");
  request = Request();
  request.set_max_requests(1 << 20);  // past the 1 MiB region limit
  EXPECT_EQ(hub_->Attach(request).status().code(), absl::StatusCode::kResourceExhausted);
  request = Request();
  request.set_lease_seconds(7200);
  EXPECT_EQ(hub_->Attach(request).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(live_buffers_, 0);
}

TEST_F(ColocatedHubTest, AttachmentsStopAtTheMaximum) {
  Worker first = Attach();
  Worker second = Attach();
  absl::StatusOr<v1::AttachResponse> third = hub_->Attach(Request());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(first.attached.shared_memory_name(), second.attached.shared_memory_name());
}

TEST_F(ColocatedHubTest, BadBatchesGetInvalidArgumentAndTheSlotGoesOn) {
  Worker worker = Attach();
  uint32_t sequence = worker.Ring(Batch(/*requests=*/0), {});
  std::optional<absl::Status> answer = Answer(worker, sequence);
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(answer->message(),
            "slot 0: num_requests 0 is not in [1, 4] (the attachment's max_requests); split the "
            "batch");
  // The answer flag is what the worker's stream waits on.
  EXPECT_EQ(colocated::LoadAcquire(worker.control(0)->answer_flag), 1u);
  sequence = worker.Ring(Batch(1, /*flags=*/8), {{1, 5}});
  answer = Answer(worker, sequence);
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->message(), "slot 1: unknown flags 8; the protocol knows 0 and 1 (keys)");
  sequence = worker.Ring(Batch(1, colocated::kSlotCarriesKeys), {{1, 5}});
  answer = Answer(worker, sequence);
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kInvalidArgument);  // attached without keys
  colocated::SlotBatchHeader wide = Batch(1);
  wide.tokens_per_request = 2;
  answer = Answer(worker, worker.Ring(wide, {{1, 5}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ColocatedHubTest, ABatchGoesThroughTheEngineAndItsValidation) {
  Worker worker = Attach();
  // A sequence the cache does not hold: the engine's own NOT_FOUND.
  std::optional<absl::Status> answer = Answer(worker, worker.Ring(Batch(1), {{42, 5}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kNotFound);
  EXPECT_NE(answer->message().find("sequence 42"), absl::string_view::npos) << answer->message();
  // A reusing or dense layer is refused as over gRPC.
  colocated::SlotBatchHeader dense = Batch(1);
  dense.layer = 0;
  answer = Answer(worker, worker.Ring(dense, {{0, 0}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kInvalidArgument);
  // A valid batch reaches the backend, which here cannot read GPU memory.
  answer = Answer(worker, worker.Ring(Batch(2), {{0, 0}, {0, 0}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(answer->message().find("GPU backend"), absl::string_view::npos) << answer->message();
}

TEST_F(ColocatedHubTest, AWrongDoorbellBreaksOnlyItsAttachment) {
  Worker broken = Attach();
  Worker healthy = Attach();
  broken.control(2)->doorbell = 12345;  // no sequence SlotSequencer gives
  hub_->PollOnce();
  std::optional<absl::Status> answer = colocated::ReadAnswer(*broken.control(2), 12345);
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kInvalidArgument);
  // The broken one answers every later doorbell with an error...
  answer = Answer(broken, broken.Ring(Batch(1), {{0, 0}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kFailedPrecondition);
  // ...while the other is served as before.
  answer = Answer(healthy, healthy.Ring(Batch(1), {{42, 5}}));
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->code(), absl::StatusCode::kNotFound);
}

TEST_F(ColocatedHubTest, RequestsGoRoundTheRingOfSlots) {
  Worker worker = Attach(/*slots=*/2);
  worker.sequencer = colocated::SlotSequencer(2);
  for (int i = 0; i < 7; ++i) {
    const uint32_t sequence = worker.Ring(Batch(1), {{42, 5}});
    std::optional<absl::Status> answer = Answer(worker, sequence);
    ASSERT_TRUE(answer.has_value()) << "request " << i;
    EXPECT_EQ(answer->code(), absl::StatusCode::kNotFound);
  }
}

TEST_F(ColocatedHubTest, DetachClosesAndFreesTheRegion) {
  Worker worker = Attach();
  v1::DetachRequest detach;
  detach.set_attachment_id(worker.attached.attachment_id());
  EXPECT_TRUE(hub_->Detach(detach).ok());
  EXPECT_EQ(worker.header().state, colocated::kRegionClosed);
  for (uint32_t slot = 0; slot < 4; ++slot) {
    EXPECT_EQ(colocated::LoadAcquire(worker.control(slot)->answer_flag), 1u)
        << "a wait on slot " << slot << " would hang";
  }
  EXPECT_EQ(live_buffers_, 0);
  EXPECT_EQ(hub_->attachments(), 0);
  EXPECT_EQ(colocated::SharedMemory::Open(worker.attached.shared_memory_name(), 64).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(hub_->Detach(detach).code(), absl::StatusCode::kNotFound);
}

TEST_F(ColocatedHubTest, AnExpiredLeaseClosesTheRegionAndRenewalsKeepIt) {
  Worker kept = Attach();
  Worker lost = Attach();
  now_ += absl::Seconds(20);
  v1::RenewAttachmentRequest renew;
  renew.set_attachment_id(kept.attached.attachment_id());
  EXPECT_TRUE(hub_->Renew(renew).ok());
  now_ += absl::Seconds(20);  // 40 s after the attach, 20 after the renewal
  EXPECT_EQ(hub_->ReleaseExpired(), 1);
  EXPECT_EQ(lost.header().state, colocated::kRegionClosed);
  EXPECT_EQ(kept.header().state, colocated::kRegionServing);
  renew.set_attachment_id(lost.attached.attachment_id());
  EXPECT_EQ(hub_->Renew(renew).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(hub_->attachments(), 1);
}

TEST_F(ColocatedHubTest, ShutdownClosesEveryRegionAndRefusesAttaches) {
  Worker worker = Attach();
  hub_->Shutdown();
  EXPECT_EQ(worker.header().state, colocated::kRegionClosed);
  EXPECT_EQ(hub_->Attach(Request()).status().code(), absl::StatusCode::kUnavailable);
}

TEST(ColocatedHubWithoutGpuTest, AttachSaysWhy) {
  const ModelConfig model = testing::SmallTestModel();
  ColocatedHub hub(model, nullptr, nullptr, "the server runs the cpu backend", ColocatedOptions{});
  v1::AttachRequest request;
  request.set_protocol_version(colocated::kProtocolVersion);
  absl::StatusOr<v1::AttachResponse> attached = hub.Attach(request);
  EXPECT_EQ(attached.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(attached.status().message(), "the server runs the cpu backend");
}

}  // namespace
}  // namespace blocksel
