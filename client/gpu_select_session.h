// A co-located worker's selections through GPU memory (the README's "Data
// planes"): the session attaches to a server on the worker's own GPU and
// then each selection is a few kernels on the worker's stream, which copy
// the queries (and new keys) into a slot of the server's region, ring its
// doorbell, wait on the GPU for the answer and copy the block ids out. No
// host thread of either process waits, so a worker can capture a decode
// step with its selections into one CUDA graph.
//
// Built only where the client is built with CUDA (or HIP); the CPU-only
// client library is unchanged. Sequences and appends keep the RPCs of
// BlockselClient.
#ifndef BLOCKSEL_CLIENT_GPU_SELECT_SESSION_H_
#define BLOCKSEL_CLIENT_GPU_SELECT_SESSION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/blocksel_client.h"
#include "colocated/shared_memory.h"
#include "colocated/slot_region.h"
#include "colocated/slot_request.h"
#include "kernels/gpu/colocated_signals.h"

namespace blocksel {

struct GpuSessionOptions {
  // The worker's GPU: the server's, or with peer_access one of the same
  // host that reaches the server's GPU (CheckPeerAccess).
  int device = 0;
  // Whether a GPU other than the server's may attach; the session then
  // checks that it reaches the server's GPU, and detaches if not.
  bool peer_access = true;
  // Selections that may be posted ahead of their awaits. A worker graph
  // must hold a multiple of slot_count selections, so that each replay
  // uses the slots the capture saw.
  uint32_t slot_count = 1;
  uint32_t max_requests = 64;       // decode requests per selection
  uint32_t tokens_per_request = 1;  // the largest Q
  bool with_keys = false;           // selections carry the new tokens' keys
  uint32_t lease_seconds = 0;       // 0: the server's default; renewed by the session
  // No wait on the GPU lasts much longer: the session's watchdog ends the
  // waits of a slot unanswered this long, and at once those of a region
  // the server closed or a server that stopped answering its lease
  // renewals (checked every second).
  absl::Duration wait_timeout = absl::Seconds(10);
};

// Thread-compatible: one stream's selections, enqueued from one thread.
class GpuSelectSession {
 public:
  // Attaches (FAILED_PRECONDITION: the server has no GPU backend, or its
  // GPU is another that this one does not reach), maps the region and
  // starts renewing its lease.
  static absl::StatusOr<std::unique_ptr<GpuSelectSession>> Attach(BlockselClient* client,
                                                                  GpuSessionOptions options);
  // Detaches. The caller's streams must be done with the session.
  ~GpuSelectSession();
  GpuSelectSession(const GpuSelectSession&) = delete;
  GpuSelectSession& operator=(const GpuSelectSession&) = delete;

  // One selection's inputs and where its answer goes. Every pointer is
  // device memory (or pinned host memory mapped for the device) holding its
  // value when the stream reaches the launch, so a captured graph selects
  // whatever the buffers hold at each replay.
  struct Selection {
    // colocated::SlotBatchHeader then num_requests SlotDecodeRequest.
    const void* batch = nullptr;
    int64_t batch_bytes = 0;
    const void* queries = nullptr;  // bf16 [rows][H][D]
    int64_t query_bytes = 0;
    const void* keys = nullptr;  // with the batch's kSlotCarriesKeys: [keyed rows][D]
    int64_t key_bytes = 0;
    int32_t* block_ids = nullptr;  // int32 [H][rows][topk]
    int64_t ids_bytes = 0;
  };

  // Enqueues on `stream` the post of one selection into the next slot.
  // INVALID_ARGUMENT when a size passes the slot's room; UNAVAILABLE once
  // the server is known to be gone.
  absl::Status Post(const Selection& selection, void* stream);
  // Enqueues on `stream` the wait for the oldest posted selection and the
  // copy of its block ids (-1 rows on any error). Posts and awaits pair up
  // in order; up to slot_count posts may run ahead of their awaits.
  absl::Status Await(int32_t* block_ids, int64_t ids_bytes, void* stream);
  // Post, then Await.
  absl::Status Select(const Selection& selection, void* stream);

  // The outcome of the last await the stream has finished (synchronize the
  // stream first): the server's status and message, or why no answer came.
  absl::Status LastStatus() const;

  uint64_t attachment_id() const { return attachment_id_; }
  const colocated::RegionLayout& layout() const { return layout_; }

 private:
  GpuSelectSession() = default;
  // Renews the lease and watches for a lost server or a stalled slot.
  void WatchLoop();
  // Ends every wait of the session now and later: the region's state and
  // answer flags in this process's mapping, as a closing server sets them.
  void CloseLocally(absl::Status why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Whether some slot is rung and unanswered, and whether any completion
  // word moved since `seen` (updated).
  bool Pending(std::vector<uint32_t>* seen, bool* moved) const;

  BlockselClient* client_ = nullptr;
  GpuSessionOptions options_;
  uint64_t attachment_id_ = 0;
  uint32_t lease_seconds_ = 0;
  colocated::RegionLayout layout_;
  std::unique_ptr<colocated::SharedMemory> host_;
  unsigned char* host_device_ = nullptr;  // host_ as kernels reach it
  unsigned char* payloads_ = nullptr;     // the server's GPU memory, mapped
  gpu::SessionWords* words_ = nullptr;    // pinned
  gpu::SessionWords* words_device_ = nullptr;
  uint32_t* sequences_ = nullptr;  // device: per slot, next posted and awaited
  uint32_t* scratch_ = nullptr;    // device
  gpu::SlotRing ring_;
  int64_t timeout_ticks_ = 0;
  // The slots the next Post and Await use.
  uint32_t next_post_slot_ = 0;
  uint32_t next_await_slot_ = 0;

  mutable absl::Mutex mutex_;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  // Not OK once the watchdog closed the session: why, for LastStatus and
  // for every later Post.
  absl::Status gone_ ABSL_GUARDED_BY(mutex_);
  std::thread watchdog_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_GPU_SELECT_SESSION_H_
