// Device buffers for GpuSelectSession selections made from host data: a
// worker whose queries are not on the GPU yet (tests, benchmarks, a
// program that prepares batches on the host) stages them here, and the
// ids come back to the host. A worker whose queries are already in device
// memory passes those to the session instead.
#ifndef BLOCKSEL_CLIENT_GPU_BATCH_BUFFERS_H_
#define BLOCKSEL_CLIENT_GPU_BATCH_BUFFERS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/gpu_select_session.h"
#include "colocated/slot_request.h"

namespace blocksel {

class GpuBatchBuffers {
 public:
  // Buffers as large as the session's slots, for the server's model
  // (GetInfo's num_heads and topk).
  static absl::StatusOr<std::unique_ptr<GpuBatchBuffers>> Create(const GpuSelectSession& session,
                                                                 int32_t num_heads, int32_t topk);
  ~GpuBatchBuffers();
  GpuBatchBuffers(const GpuBatchBuffers&) = delete;
  GpuBatchBuffers& operator=(const GpuBatchBuffers&) = delete;

  // Writes one selection's batch (header and requests) and enqueues on
  // `stream` the copies of its queries and keys (keys may be empty: the
  // header's flags say whether it carries any). The host strings may be
  // reused once the stream has passed the copies.
  absl::Status Stage(const colocated::SlotBatchHeader& header,
                     const std::vector<colocated::SlotDecodeRequest>& requests,
                     const std::string& queries, const std::string& keys, void* stream);
  // The staged selection, answering into these buffers' ids.
  GpuSelectSession::Selection selection() const { return selection_; }
  // The staged selection's block ids, int32 [H][rows][topk], once the
  // stream has passed its await (synchronizes the stream).
  absl::StatusOr<std::vector<int32_t>> FetchIds(void* stream);

 private:
  GpuBatchBuffers() = default;

  void* batch_ = nullptr;  // pinned, read by the device at its mapped address
  void* queries_ = nullptr;
  void* keys_ = nullptr;
  int32_t* ids_ = nullptr;
  GpuSelectSession::Selection selection_;
  colocated::RegionSizes sizes_;
  int32_t num_heads_ = 0;
  int32_t topk_ = 0;
};

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_GPU_BATCH_BUFFERS_H_
