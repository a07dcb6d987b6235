// The server's side of the co-located GPU data plane: attachments (a region
// per worker, with a lease), the thread that notices rung doorbells, and
// the hand-off of each rung slot to the engine with its payload left in GPU
// memory (see colocated/slot_region.h for the region, slot_protocol.h for
// the words, slot_request.h for the batch a slot describes).
//
// A slot's selection goes through the same SelectBatcher and engine as the
// gRPC traffic: same validation, cache, order and executor; it launches on
// its own (its answer goes to its slot). On success the backend writes the
// block ids into the slot and signals its completion word on the device;
// any error (bad metadata, validation, a full queue, a device failure) is
// written by the host into the slot's status and message, then the word.
#ifndef BLOCKSEL_SERVER_COLOCATED_COLOCATED_HUB_H_
#define BLOCKSEL_SERVER_COLOCATED_COLOCATED_HUB_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.pb.h"
#include "colocated/shared_memory.h"
#include "colocated/slot_protocol.h"
#include "colocated/slot_region.h"
#include "server/colocated/region_device.h"
#include "server/engine/backend.h"
#include "server/engine/model_config.h"
#include "server/engine/select_batcher.h"
#include "server/engine/select_times.h"

namespace blocksel {

struct ColocatedOptions {
  int max_attachments = 16;
  // GPU memory one attachment's payloads may take.
  int64_t max_region_bytes = int64_t{256} << 20;
  int max_tokens_per_request = 64;
  absl::Duration default_lease = absl::Seconds(30);
  absl::Duration max_lease = absl::Hours(1);
  // Time source for leases; tests substitute a fake clock.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
  // Told the server's stage times of each selection answered on the GPU
  // (queued to computed); may be empty.
  std::function<void(const SelectTimes&)> on_answered;
};

// Thread-safe.
class ColocatedHub {
 public:
  // device may be null: every Attach is then FAILED_PRECONDITION with
  // `why_not` (the server's backend has no GPU). batcher must outlive the
  // hub.
  ColocatedHub(const ModelConfig& model, SelectBatcher* batcher,
               std::unique_ptr<RegionDevice> device, std::string why_not, ColocatedOptions options);
  // Shuts down, then frees every region left.
  ~ColocatedHub();

  absl::StatusOr<v1::AttachResponse> Attach(const v1::AttachRequest& request);
  absl::Status Renew(const v1::RenewAttachmentRequest& request);
  // Closes the region: its slots in flight are answered, then it is freed.
  absl::Status Detach(const v1::DetachRequest& request);
  // Closes the regions whose lease ran out; returns how many.
  int ReleaseExpired();

  // Scans every region's doorbells once and hands out what is rung;
  // returns how many slots it handled.
  int PollOnce();
  // A thread that polls while any region is attached (spinning, so a
  // doorbell is seen within microseconds: one core while workers are
  // attached) and sleeps otherwise. It also releases expired attachments.
  void StartPolling();
  // Stops polling and closes every region, so that waiting workers end
  // their waits; regions with slots in the engine are freed as those are
  // answered (drain the executor afterwards). Attach is UNAVAILABLE from
  // then on.
  void Shutdown();

  int attachments() const;

 private:
  // A rung slot handed to the engine, kept until its answer.
  struct InFlight {
    v1::SelectRequest request;
    DevicePayload payload;
    SelectTimes times;
  };
  struct Region {
    uint64_t id = 0;
    colocated::RegionLayout layout;
    uint32_t max_requests = 0;
    uint32_t tokens_per_request = 0;
    std::unique_ptr<colocated::SharedMemory> host;
    unsigned char* host_device = nullptr;  // the host part as kernels reach it
    unsigned char* payloads = nullptr;     // the device part
    std::unique_ptr<colocated::DoorbellScanner> scanner;
    std::vector<std::unique_ptr<InFlight>> in_flight;  // per slot
    int pending = 0;  // slots handed to the engine, not yet answered
    absl::Duration lease;
    absl::Time expires;
    bool closed = false;

    colocated::SlotControl* control(uint32_t slot) const {
      return reinterpret_cast<colocated::SlotControl*>(host->data() + layout.ControlOffset(slot));
    }
  };

  absl::StatusOr<absl::Duration> LeaseOf(uint32_t seconds) const;
  // Reads and checks a rung slot's batch and builds its request and payload.
  absl::StatusOr<std::unique_ptr<InFlight>> Prepare(const Region& region, uint32_t slot,
                                                    uint32_t sequence) const;
  void Serve(Region& region, const colocated::DoorbellScanner::Rung& rung)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // The host's answer to a slot (an error, or a slot never handed out).
  void AnswerFromHost(Region& region, uint32_t slot, uint32_t sequence, const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void OnAnswered(uint64_t id, uint32_t slot, uint32_t sequence, const absl::Status& status)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // Marks the region closed to the worker; frees it once nothing is in
  // flight.
  void Close(Region& region) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void FreeIfIdle(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void FreeRegion(Region& region);
  void PollLoop();
  bool HasWorkOrStops() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    return stopping_ || !regions_.empty();
  }

  const ModelConfig model_;
  SelectBatcher* const batcher_;
  const std::unique_ptr<RegionDevice> device_;
  const std::string why_not_;
  const ColocatedOptions options_;
  const uint32_t epoch_;

  mutable absl::Mutex mutex_;
  uint64_t next_id_ ABSL_GUARDED_BY(mutex_) = 1;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Region>> regions_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread poller_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_COLOCATED_COLOCATED_HUB_H_
