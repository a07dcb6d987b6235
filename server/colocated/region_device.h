// The GPU a co-located region lives on, as the hub needs it: device memory
// another process can map, and host memory its kernels can reach. Behind
// an interface so the hub's protocol handling is tested against host
// memory on machines without a GPU.
#ifndef BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_
#define BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace blocksel {

class RegionDevice {
 public:
  struct Buffer {
    void* address = nullptr;  // device address
    std::string ipc_handle;   // what another process opens to map it
  };

  virtual ~RegionDevice() = default;
  // The device's PCI bus id, as a worker reports its own.
  virtual const std::string& pci_bus_id() const = 0;
  // Zeroed device memory another process on this host can map.
  virtual absl::StatusOr<Buffer> Allocate(int64_t bytes) = 0;
  virtual void Free(void* address) = 0;
  // The address kernels reach `bytes` of host memory at `host` under.
  virtual absl::StatusOr<void*> MapHost(void* host, int64_t bytes) = 0;
  virtual void UnmapHost(void* host) = 0;
};

// The GPU backend's device: FAILED_PRECONDITION in a build without GPU
// support or when the device cannot be used.
absl::StatusOr<std::unique_ptr<RegionDevice>> CreateGpuRegionDevice(int device);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_
