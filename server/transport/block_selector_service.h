// The gRPC face of the engine: blocksel.v1.BlockSelector.
#ifndef BLOCKSEL_SERVER_TRANSPORT_BLOCK_SELECTOR_SERVICE_H_
#define BLOCKSEL_SERVER_TRANSPORT_BLOCK_SELECTOR_SERVICE_H_

#include <cstdint>
#include <string>

#include "blocksel/v1/block_selector.grpc.pb.h"
#include "proto/blocksel/v1/wire_limits.h"
#include "server/colocated/colocated_hub.h"
#include "server/engine/engine.h"
#include "server/engine/executor.h"
#include "server/engine/select_batcher.h"
#include "server/metrics/server_metrics.h"

namespace blocksel {

struct ServiceOptions {
  int max_inflight_per_stream = 4;
  // Threads serving StreamSelect on completion queues, one queue each.
  int stream_threads = 2;
  int64_t max_message_bytes = kDefaultMaxMessageBytes;  // reported by GetInfo
  std::string server_version;
  std::string snapshot_path;  // empty: WriteSnapshot is FAILED_PRECONDITION
};

// The service's methods: StreamSelect, the hot path, on gRPC's async API
// (SelectStreamCall, served by the server's own completion-queue threads),
// the others on its callback API.
using BlockSelectorServiceBase = v1::BlockSelector::WithCallbackMethod_GetInfo<
    v1::BlockSelector::WithCallbackMethod_OpenSequence<
        v1::BlockSelector::WithCallbackMethod_ReleaseSequence<
            v1::BlockSelector::WithCallbackMethod_RenewLease<
                v1::BlockSelector::WithCallbackMethod_AppendKeys<
                    v1::BlockSelector::WithCallbackMethod_StreamAppendKeys<
                        v1::BlockSelector::WithCallbackMethod_Select<
                            v1::BlockSelector::WithAsyncMethod_StreamSelect<
                                v1::BlockSelector::WithCallbackMethod_WriteSnapshot<
                                    v1::BlockSelector::WithCallbackMethod_Attach<
                                        v1::BlockSelector::WithCallbackMethod_RenewAttachment<
                                            v1::BlockSelector::WithCallbackMethod_Detach<
                                                v1::BlockSelector::Service>>>>>>>>>>>>;

// Every engine operation runs on the executor, selections through the
// batcher; the reactors only decode, queue and answer. The co-located
// control calls go to the hub, which is thread-safe, on gRPC's thread
// (an attach allocates GPU memory, which the executor should not wait for).
// Status codes pass through unchanged.
class BlockSelectorService final : public BlockSelectorServiceBase {
 public:
  // metrics records every request and stream.
  BlockSelectorService(Engine* engine, Executor* executor, SelectBatcher* batcher,
                       ColocatedHub* colocated, ServerMetrics* metrics, ServiceOptions options);

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* context,
                                    const v1::GetInfoRequest* request,
                                    v1::GetInfoResponse* response) override;
  grpc::ServerUnaryReactor* OpenSequence(grpc::CallbackServerContext* context,
                                         const v1::OpenSequenceRequest* request,
                                         v1::OpenSequenceResponse* response) override;
  grpc::ServerUnaryReactor* ReleaseSequence(grpc::CallbackServerContext* context,
                                            const v1::ReleaseSequenceRequest* request,
                                            v1::ReleaseSequenceResponse* response) override;
  grpc::ServerUnaryReactor* RenewLease(grpc::CallbackServerContext* context,
                                       const v1::RenewLeaseRequest* request,
                                       v1::RenewLeaseResponse* response) override;
  grpc::ServerUnaryReactor* AppendKeys(grpc::CallbackServerContext* context,
                                       const v1::AppendKeysRequest* request,
                                       v1::AppendKeysResponse* response) override;
  grpc::ServerReadReactor<v1::AppendKeysRequest>* StreamAppendKeys(
      grpc::CallbackServerContext* context, v1::AppendKeysResponse* response) override;
  grpc::ServerUnaryReactor* Select(grpc::CallbackServerContext* context,
                                   const v1::SelectRequest* request,
                                   v1::SelectResponse* response) override;
  grpc::ServerUnaryReactor* WriteSnapshot(grpc::CallbackServerContext* context,
                                          const v1::WriteSnapshotRequest* request,
                                          v1::WriteSnapshotResponse* response) override;
  grpc::ServerUnaryReactor* Attach(grpc::CallbackServerContext* context,
                                   const v1::AttachRequest* request,
                                   v1::AttachResponse* response) override;
  grpc::ServerUnaryReactor* RenewAttachment(grpc::CallbackServerContext* context,
                                            const v1::RenewAttachmentRequest* request,
                                            v1::RenewAttachmentResponse* response) override;
  grpc::ServerUnaryReactor* Detach(grpc::CallbackServerContext* context,
                                   const v1::DetachRequest* request,
                                   v1::DetachResponse* response) override;

 private:
  // Runs operation() on the executor and finishes the call with its status,
  // unless the call was cancelled or its deadline passed while it waited.
  template <typename Operation>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* context, RpcMethod method,
                                     const google::protobuf::Message* request,
                                     const google::protobuf::Message* response,
                                     Operation operation);
  // Records the call in the metrics and finishes it.
  void FinishUnary(grpc::ServerUnaryReactor* reactor, RpcMethod method, absl::Time arrived,
                   const absl::Status& status, const google::protobuf::Message& request,
                   const google::protobuf::Message& response);

  Engine* const engine_;
  Executor* const executor_;
  SelectBatcher* const batcher_;
  ColocatedHub* const colocated_;
  ServerMetrics* const metrics_;
  const ServiceOptions options_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_BLOCK_SELECTOR_SERVICE_H_
