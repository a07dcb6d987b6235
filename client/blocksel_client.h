// A typed C++ client of blocksel.v1.BlockSelector.
#ifndef BLOCKSEL_CLIENT_BLOCKSEL_CLIENT_H_
#define BLOCKSEL_CLIENT_BLOCKSEL_CLIENT_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "grpcpp/channel.h"
#include "proto/blocksel/v1/wire_limits.h"

namespace blocksel {

struct ClientOptions {
  // Deadline of every unary call (retries included) and append stream;
  // select sessions are long-lived and have none.
  absl::Duration timeout = absl::Seconds(30);
  int64_t max_message_bytes = kDefaultMaxMessageBytes;
  // Calls whose repetition cannot change the outcome (GetInfo,
  // ReleaseSequence, RenewLease, AppendKeys and Select, whose appends are
  // addressed by position, WriteSnapshot) are retried on UNAVAILABLE up to
  // max_attempts times in all, with jittered exponential backoff.
  // OpenSequence and the streams are never retried.
  int max_attempts = 3;
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(1);
};

// Block ids of one selection, unpacked.
struct SelectResult {
  uint64_t request_id = 0;
  int32_t num_heads = 0;
  int32_t total_q = 0;
  int32_t topk = 0;
  v1::BlockIdLayout layout = v1::BLOCK_ID_LAYOUT_HEAD_MAJOR;
  std::vector<int32_t> block_ids;

  // The slot'th selected block of (head, row), in either layout.
  int32_t at(int32_t head, int32_t row, int32_t slot) const;
};

// One StreamSelect call: the per-layer loop of an attention worker. Send
// and Receive may run on two threads (one each); responses come in request
// order.
//
// On a server that reuses selections across layers (GetInfo's
// selecting_layers), Receive waits for the Send it answers, and a batch for
// a reusing layer never leaves the client:
// Receive answers it with this session's latest selection of the layer it
// reuses, under the batch's own request_id. So a worker that calls once per
// sparse layer sends only the selecting layers' batches; the keys its
// reusing layers' batches carry are dropped (the server stores none for
// those layers).
//
// A batch for a layer the server audits (GetInfo's audited_layers) is
// answered the same way, and also sent to the server marked `audit`, so
// that the server can compare that layer's own selection with the one it
// reuses. The answer never changes: the server's reply to an audit carries
// no blocks and is read and dropped before the next answer from the server.
// A worker appends keys for audited layers too (AppendKeys accepts them).
class SelectSession {
 public:
  ~SelectSession();

  // Queues one batch. UNAVAILABLE (or the call's status) if the stream broke.
  absl::Status Send(const v1::SelectRequest& request);
  // The next response. An in-band error comes back as its status.
  absl::StatusOr<SelectResult> Receive();
  // Send, then Receive: one round trip.
  absl::StatusOr<SelectResult> Call(const v1::SelectRequest& request);
  // Half-closes and returns the call's final status.
  absl::Status Close();

 private:
  friend class BlockselClient;
  // selecting_layers: the server's, ascending (empty: every layer selects);
  // audited_layers: the reusing layers it audits.
  SelectSession(std::vector<int32_t> selecting_layers, std::vector<int32_t> audited_layers)
      : selecting_layers_(std::move(selecting_layers)),
        audited_layers_(std::move(audited_layers)) {}

  // What Receive answers next, in the order of the Sends.
  struct Pending {
    uint64_t request_id = 0;
    int64_t layer = 0;
    int64_t reused_layer = -1;  // >= 0: answered from that layer's selection
    bool audit = false;         // also sent as an audit, whose reply is dropped
  };
  // The selecting layer whose selection `layer` reuses; -1 when the server
  // selects it (or it is no sparse layer, which the server refuses).
  int64_t ReusedLayer(int64_t layer) const;
  // Writes one request; on failure the session is closed and the call's
  // status returned.
  absl::Status Write(const v1::SelectRequest& request);
  // Reads and drops the replies to audits that Receive answered already;
  // false if the stream ended.
  bool DropAuditReplies();

  const std::vector<int32_t> selecting_layers_;
  const std::vector<int32_t> audited_layers_;
  absl::Mutex mutex_;
  std::deque<Pending> pending_ ABSL_GUARDED_BY(mutex_);
  // The latest answer for each layer, kept while the server reuses
  // selections.
  std::map<int64_t, absl::StatusOr<SelectResult>> latest_ ABSL_GUARDED_BY(mutex_);
  // Replies to audits already answered here, still to read and drop.
  int64_t audit_replies_to_drop_ ABSL_GUARDED_BY(mutex_) = 0;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SelectRequest, v1::SelectResponse>> stream_;
  bool closed_ = false;
};

// Thread-safe: one client may serve many threads.
class BlockselClient {
 public:
  // target: "host:port" or "unix:/path". Connects lazily.
  explicit BlockselClient(const std::string& target, ClientOptions options = {});

  absl::StatusOr<v1::GetInfoResponse> GetInfo();
  // sequence_id 0 lets the server choose; lease_seconds 0 takes its default.
  absl::StatusOr<uint64_t> OpenSequence(uint64_t sequence_id = 0, uint32_t lease_seconds = 0);
  // True if the sequence was open.
  absl::StatusOr<bool> ReleaseSequence(uint64_t sequence_id);
  absl::Status RenewLease(absl::Span<const uint64_t> sequence_ids);
  // Returns the tokens appended (tokens times layers).
  absl::StatusOr<uint64_t> AppendKeys(const v1::AppendKeysRequest& request);
  // Streams the requests in order; stops at the first failure.
  absl::StatusOr<uint64_t> StreamAppendKeys(absl::Span<const v1::AppendKeysRequest> requests);
  absl::StatusOr<SelectResult> Select(const v1::SelectRequest& request);
  // Asks the server to write its cache snapshot now.
  absl::StatusOr<v1::WriteSnapshotResponse> WriteSnapshot();
  // The co-located data plane's control (GpuSelectSession uses them).
  absl::StatusOr<v1::AttachResponse> Attach(const v1::AttachRequest& request);
  absl::Status RenewAttachment(uint64_t attachment_id, uint32_t lease_seconds);
  absl::Status Detach(uint64_t attachment_id);
  // Opens a StreamSelect session; it lives until Close or destruction. It
  // asks GetInfo for the layers whose selections the server reuses; if that
  // call fails, the session sends every batch.
  absl::StatusOr<std::unique_ptr<SelectSession>> StartSelectSession();

 private:
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // Runs call(context) under the timeout, retrying as ClientOptions says.
  template <typename Call>
  grpc::Status Retried(Call call) const;

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::BlockSelector::Stub> stub_;
};

// The selection's status as an absl::Status (OK for a selection).
absl::StatusOr<SelectResult> ToSelectResult(const v1::SelectResponse& response);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_BLOCKSEL_CLIENT_H_
