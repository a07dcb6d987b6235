#include "client/gpu_peer_access.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel {

absl::Status CheckPeerAccess(int device, const std::string& server_bus_id) {
  std::string own_bus_id;
  if (gpu::PciBusId(device, &own_bus_id) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU ", device, " cannot be used: ", gpu::LastErrorText()));
  }
  if (absl::EqualsIgnoreCase(own_bus_id, server_bus_id)) {
    return absl::OkStatus();
  }
  int server_device = -1;
  if (gpu::DeviceByPciBusId(server_bus_id, &server_device) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("the server's GPU ", server_bus_id,
                     " is not visible in this process (its GPU ", device, " is ", own_bus_id,
                     "): make both visible (CUDA_VISIBLE_DEVICES) so that the server's "
                     "memory can be reached over peer access, or use the gRPC data plane"));
  }
  bool reaches = false;
  if (gpu::CanAccessPeer(device, server_device, &reaches) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(absl::StrCat("asking whether GPU ", own_bus_id,
                                                      " reaches GPU ", server_bus_id, ": ",
                                                      gpu::LastErrorText()));
  }
  if (!reaches) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPU ", own_bus_id, " has no peer access to the server's GPU ", server_bus_id,
        " (no NVLink or PCIe peer to peer between them): run the worker on the server's GPU "
        "or on one that reaches it, or use the gRPC data plane"));
  }
  return absl::OkStatus();
}

}  // namespace blocksel
