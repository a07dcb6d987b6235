// The GPU side of the co-located data plane: the kernels that post a
// request into a slot, wait for its answer and signal it, all in stream
// order, so that a worker's selection is a few launches on its own stream
// (capturable into its graphs) and the server's answer needs no host.
//
// The kernels know nothing of the region's layout beyond the addresses and
// strides they are given (colocated/slot_region.h computes them). Words
// shared with another process are read and written with system-scope
// fences, since the other side is a CPU thread or another context.
#ifndef BLOCKSEL_KERNELS_GPU_COLOCATED_SIGNALS_H_
#define BLOCKSEL_KERNELS_GPU_COLOCATED_SIGNALS_H_

#include <cstdint>

#include "kernels/selection_types.h"

namespace blocksel::gpu {

// The outcome of a worker's last await, in pinned memory its host reads
// after synchronizing the stream. Zero before the first await.
struct SessionWords {
  uint32_t last_sequence = 0;
  int32_t last_status = 0;  // the server's status (a gRPC code; 0: OK)
  uint32_t failure = 0;     // a SessionFailure: why no answer came; sticky
  uint32_t reserved = 0;
};

enum class SessionFailure : uint32_t {
  kNone = 0,
  kRegionClosed = 1,  // closed by the server (detach, lease, shutdown) or the
                      // worker's watchdog (server gone, no answer in time)
  kTimedOut = 2,      // a slot stayed busy past the limit
};

// One slot ring of a region, as a kernel addresses it.
struct SlotRing {
  uint32_t slot_count = 0;
  // Host part (device addresses of the mapped shared memory).
  unsigned char* controls = nullptr;  // slot i's control at controls + i * control_stride
  int64_t control_stride = 0;
  int64_t doorbell_offset = 0;  // of each word within a control
  int64_t answer_flag_offset = 0;
  int64_t completion_offset = 0;
  int64_t status_offset = 0;
  unsigned char* metadata = nullptr;  // slot i's at metadata + i * metadata_stride
  int64_t metadata_stride = 0;
  const uint32_t* region_state = nullptr;  // RegionHeader::state
  uint32_t serving_state = 0;              // the value that means serving
  // Device part.
  unsigned char* payloads = nullptr;  // slot i's at payloads + i * slot_stride
  int64_t slot_stride = 0;
};

// One selection a worker posts: every pointer is device memory (or pinned
// memory mapped for the device) that holds its value when the stream gets
// to the launch, so a captured launch posts whatever the buffers hold at
// replay.
struct PostedRequest {
  const void* queries = nullptr;  // copied to the slot's payload + query_offset
  int64_t query_bytes = 0;
  int64_t query_offset = 0;
  const void* keys = nullptr;  // optional: to payload + key_offset
  int64_t key_bytes = 0;
  int64_t key_offset = 0;
  const void* metadata = nullptr;  // the batch description, to the slot's metadata
  int64_t metadata_bytes = 0;
};

// A worker's slots are used in turn, so which slot a post or an await uses
// is known when it is enqueued (a captured graph uses the same slots at
// every replay when it holds a multiple of slot_count selections); the
// sequence numbers live on the device, in sequences (device memory,
// 2 * slot_count words: the next sequence each slot posts, then the next
// each slot awaits, starting at the slot's index), so every replay rings a
// new one.
//
// Posts the slot's next sequence: waits until the slot is free (its
// completion word holds the sequence slot_count before), copies the
// request, then rings the doorbell. If the region closes or timeout_ticks
// pass first, nothing is rung and words->failure says why. scratch: two
// zeroed device words the posts of one session share (they count arriving
// CTAs and are zero again after each launch).
KernelStatus LaunchPostRequest(const SlotRing& ring, const PostedRequest& request, uint32_t slot,
                               uint32_t* sequences, SessionWords* words, uint32_t* scratch,
                               int64_t timeout_ticks, void* stream);

// Awaits the slot's next sequence: the stream waits (without a kernel, so
// the server's kernels keep the GPU) until the slot's answer flag is set,
// then a kernel copies ids_bytes of block ids from the slot's payload +
// ids_offset into ids (device), records the answer's status in words and
// clears the flag. A refused request, a failed post or a closed region
// fill ids with -1 instead.
KernelStatus LaunchAwaitAnswer(const SlotRing& ring, uint32_t slot, int64_t ids_offset,
                               int64_t ids_bytes, int32_t* ids, uint32_t* sequences,
                               SessionWords* words, void* stream);

// The server's answer to one slot, after the selection's kernels in stream
// order: rows of row_bytes of block ids copied (from device or pinned
// memory, each side with its pitch) into the slot, then status OK, no
// message, the completion word holding sequence, and the answer flag set.
// One launch, so the worker's wait ends one kernel after the selection.
struct DeliveredAnswer {
  const void* from = nullptr;
  int64_t from_pitch = 0;
  void* to = nullptr;
  int64_t to_pitch = 0;
  int64_t row_bytes = 0;
  int64_t rows = 0;
  int32_t* status = nullptr;
  uint32_t* message_bytes = nullptr;
  uint32_t* completion = nullptr;
  uint32_t* answer_flag = nullptr;
  uint32_t sequence = 0;
};
KernelStatus LaunchDeliverAnswer(const DeliveredAnswer& answer, void* stream);

// Device clock ticks per second, for the timeouts above.
int64_t TicksPerSecond(int device);

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_COLOCATED_SIGNALS_H_
