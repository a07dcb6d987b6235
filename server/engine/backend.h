// The interface between the engine (host logic) and a compute backend that
// owns the key storage (host memory for CPU, device memory for GPUs).
#ifndef BLOCKSEL_SERVER_ENGINE_BACKEND_H_
#define BLOCKSEL_SERVER_ENGINE_BACKEND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kernels/selection_types.h"

namespace blocksel {

// Keys of num_tokens consecutive tokens of one sparse layer, all inside one
// page: slots [first_slot, first_slot + num_tokens) of page.
struct KeyWrite {
  int32_t layer_index = 0;  // key layer index (ModelConfig::KeyLayerIndex)
  int32_t page = 0;
  int32_t first_slot = 0;
  int32_t num_tokens = 0;
  const uint8_t* keys = nullptr;  // num_tokens * token bytes, packed
};

// Where to copy keys of num_tokens consecutive tokens of one sparse layer,
// all inside one page, out of the store.
struct KeyRead {
  int32_t layer_index = 0;
  int32_t page = 0;
  int32_t first_slot = 0;
  int32_t num_tokens = 0;
  uint8_t* keys = nullptr;  // num_tokens * token bytes
};

// A selection whose payload stays in GPU memory: a co-located worker's
// slot (colocated/slot_region.h). The backend reads the queries and the
// keys from the slot, writes the block ids into it and then signals the
// slot's answer words, all in stream order on the device, so the worker
// has its answer without any host in between.
struct DevicePayload {
  const void* queries = nullptr;  // device: bf16 [rows][H][D]
  int64_t query_bytes = 0;        // room the slot has for them
  // Device, or null when the batch carries no keys: the requests' new keys
  // in request order, [Q][D] each for every request that is not padding.
  const uint8_t* keys = nullptr;
  int64_t key_bytes = 0;         // room the slot has for them
  int32_t* block_ids = nullptr;  // device: int32 [H][rows][topk]
  int64_t ids_bytes = 0;         // room the slot has for them
  // The slot's answer words, as kernels address them: status OK and no
  // message, then sequence in the completion word, then the answer flag.
  int32_t* status = nullptr;
  uint32_t* message_bytes = nullptr;
  uint32_t* completion = nullptr;
  uint32_t* answer_flag = nullptr;
  uint32_t sequence = 0;
};

// How a backend ran a selection.
enum class LaunchMode { kDirect, kGraph };

// What a backend reports about one selection it ran.
struct SelectionReport {
  LaunchMode mode = LaunchMode::kDirect;
  // Staging the inputs on the host and copying them to the device (zero on
  // the CPU), then the selection itself.
  absl::Duration upload;
  absl::Duration compute;
};

// Storage for keys. Separate from Backend so the cache can be tested with a
// plain in-memory store.
class KeyStore {
 public:
  virtual ~KeyStore() = default;
  // Copies every write into the store before returning (the caller's bytes
  // may be freed afterwards). Writes are already validated by the caller.
  virtual absl::Status WriteKeys(absl::Span<const KeyWrite> writes) = 0;
  // Copies stored keys out (snapshots). Reads are validated by the caller.
  virtual absl::Status ReadKeys(absl::Span<const KeyRead> reads) = 0;
  // The sequence holding `table_slot` was released: a store keeping its
  // own copy of the sequence's block table (see RowSpan::table_slot)
  // forgets it, since the slot will name another sequence next.
  virtual void ForgetBlockTable(int32_t /*table_slot*/) {}
};

// A selection backend. Created for one model config and page count.
//
// Selections are asynchronous: Start stages one and hands it to the device,
// and FinishOldest completes the oldest one started. A GPU backend keeps a
// few in flight, so the engine can plan and stage the next selection while
// the device runs the last one; the CPU backend runs each in Start. Every
// operation, keys included, takes effect in the order it was made.
//
// Thread-compatible: the engine calls it from one thread at a time.
class Backend : public KeyStore {
 public:
  virtual absl::string_view name() const = 0;  // "cpu", "cuda", "hip"
  virtual std::string detail() const = 0;      // ISA, device name, threads

  // Starts one selection over key layer layer_index, after writing
  // `writes` (keys the batch's requests carry, validated and accounted by
  // the cache) into the store. batch.key_pool and batch.num_pages are
  // ignored: the backend uses its own storage. The batch's host inputs
  // (spans, block tables, queries) and the writes' keys are read before
  // Start returns; its block_ids and block_scores (host memory) are written
  // by the time FinishOldest returns for it, and must stay valid until then.
  // Needs pending() < max_pending(). On error nothing was started.
  //
  // With a device payload (may be null), batch.queries and every write's
  // keys are device addresses inside it, and the block ids also go to the
  // payload, which is signalled once they are there. A backend without a
  // GPU refuses it (FAILED_PRECONDITION).
  virtual absl::Status Start(int32_t layer_index, const SelectionBatch& batch,
                             absl::Span<const KeyWrite> writes, const DevicePayload* device) = 0;
  // Selections started and not finished.
  virtual int pending() const = 0;
  // How many may be pending at once.
  virtual int max_pending() const = 0;
  // Whether the oldest pending selection's device work is done, so that
  // FinishOldest will not wait. Never blocks.
  virtual bool OldestReady() = 0;
  // Waits for the oldest pending selection, writes its outputs and says how
  // it ran.
  virtual absl::StatusOr<SelectionReport> FinishOldest() = 0;
};

// Maps a kernel result to a status; context names the failing operation,
// device_error the runtime's own text for a device error (if known).
absl::Status KernelStatusToStatus(KernelStatus status, absl::string_view context,
                                  absl::string_view device_error = "");

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_BACKEND_H_
