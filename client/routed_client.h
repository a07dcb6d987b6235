// Several blocksel servers behind one client, with sequence-affine routing.
#ifndef BLOCKSEL_CLIENT_ROUTED_CLIENT_H_
#define BLOCKSEL_CLIENT_ROUTED_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "blocksel/v1/block_selector.pb.h"
#include "client/blocksel_client.h"

namespace blocksel {

// The index of the target that owns sequence_id by rendezvous (highest
// random weight) hashing: each (target, id) pair gets a pseudo-random
// weight and the highest wins. Adding or removing a target moves only the
// sequences that target wins or owned. targets must not be empty.
size_t RendezvousOwner(absl::Span<const std::string> targets, uint64_t sequence_id);

// Each sequence lives on the server RendezvousOwner picks for its id, so a
// fleet of sidecars (one per GPU) can serve one scheduler. Ids are chosen
// by the client (routing needs them before any server sees the sequence).
//
// Batches that span servers are split by owner, the parts run
// concurrently, and the answers are put back in the batch's row order. A
// split AppendKeys is all-or-nothing per server, not across servers.
//
// Thread-safe.
class RoutedClient {
 public:
  // targets: "host:port" or "unix:/path", at least one.
  explicit RoutedClient(std::vector<std::string> targets, ClientOptions options = {});

  size_t num_servers() const { return clients_.size(); }
  size_t ServerFor(uint64_t sequence_id) const;
  BlockselClient& server(size_t index) { return *clients_[index]; }

  // Opens the sequence on its server; sequence_id 0 picks a random id.
  absl::StatusOr<uint64_t> OpenSequence(uint64_t sequence_id = 0, uint32_t lease_seconds = 0);
  absl::StatusOr<bool> ReleaseSequence(uint64_t sequence_id);
  absl::StatusOr<uint64_t> AppendKeys(const v1::AppendKeysRequest& request);
  // Block ids come back head-major [H, total_q, topk] whatever the
  // request's layout.
  absl::StatusOr<SelectResult> Select(const v1::SelectRequest& request);

 private:
  std::vector<std::string> targets_;
  std::vector<std::unique_ptr<BlockselClient>> clients_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_ROUTED_CLIENT_H_
