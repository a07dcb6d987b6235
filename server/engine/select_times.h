// When one selection request passed each point of its way through the
// server, and the stages between those points: what the per-stage latency
// metrics (blocksel_select_stage_seconds) record.
#ifndef BLOCKSEL_SERVER_ENGINE_SELECT_TIMES_H_
#define BLOCKSEL_SERVER_ENGINE_SELECT_TIMES_H_

#include <algorithm>
#include <array>

#include "absl/time/time.h"

namespace blocksel {

// The stages, in the order a request goes through them; together they span
// its whole time in the server.
enum class SelectStage {
  kReceive,   // received -> queued: the transport, up to the engine's queue
  kQueue,     // queued -> started: waiting for the engine thread (and a batch window)
  kPlan,      // started -> planned: validation, cache bookkeeping, appends
  kUpload,    // the backend staging inputs and copying them to the device
  kCompute,   // the selection kernels on the device
  kDownload,  // the rest until the ids are on the host: copy back, launch and notice latency
  kRespond,   // downloaded -> written: the response message, a wait behind the stream's
              // write in flight, and handing it to gRPC, which serializes and sends it
};
inline constexpr int kSelectStages = 7;
inline constexpr std::array<const char*, kSelectStages> kSelectStageNames = {
    "receive", "queue", "plan", "upload", "compute", "download", "respond"};

// Filled in along the way: received and queued by the transport, started by
// whoever dequeues the request, planned and downloaded by the engine,
// upload and compute by the backend, written by the transport again.
struct SelectTimes {
  absl::Time received;
  absl::Time queued;
  absl::Time started;
  absl::Time planned;
  absl::Duration upload;   // part of planned -> downloaded
  absl::Duration compute;  // part of planned -> downloaded
  absl::Time downloaded;
  absl::Time written;

  // Each stage's duration. The backend's span, planned -> downloaded, is
  // upload + compute + download, download taking what the first two leave.
  std::array<absl::Duration, kSelectStages> Stages() const {
    const absl::Duration backend = downloaded - planned;
    return {queued - received,
            started - queued,
            planned - started,
            upload,
            compute,
            std::max(backend - upload - compute, absl::ZeroDuration()),
            written - downloaded};
  }
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_SELECT_TIMES_H_
