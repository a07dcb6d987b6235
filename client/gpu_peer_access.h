// Whether a worker's GPU reaches the memory of a co-located server's GPU:
// the same GPU, or another GPU of the host with peer access (NVLink or
// PCIe peer to peer). GpuSelectSession checks it after attaching.
#ifndef BLOCKSEL_CLIENT_GPU_PEER_ACCESS_H_
#define BLOCKSEL_CLIENT_GPU_PEER_ACCESS_H_

#include <string>

#include "absl/status/status.h"

namespace blocksel {

// OK when GPU `device` of this process is the GPU named server_bus_id (a
// PCI bus id) or reaches it over peer access; FAILED_PRECONDITION saying
// why not and what to do: the server's GPU is not visible in this process,
// or the two GPUs have no peer access.
absl::Status CheckPeerAccess(int device, const std::string& server_bus_id);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_GPU_PEER_ACCESS_H_
