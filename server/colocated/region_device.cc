#include "server/colocated/region_device.h"

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#if defined(BLOCKSEL_HAVE_GPU)
#include "kernels/gpu/gpu_selection.h"
#endif

namespace blocksel {

#if defined(BLOCKSEL_HAVE_GPU)
namespace {

absl::Status DeviceError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", gpu::LastErrorText()));
}

class GpuRegionDevice final : public RegionDevice {
 public:
  GpuRegionDevice(int device, std::string pci_bus_id)
      : device_(device), pci_bus_id_(std::move(pci_bus_id)) {}

  const std::string& pci_bus_id() const override { return pci_bus_id_; }

  absl::StatusOr<Buffer> Allocate(int64_t bytes) override {
    if (gpu::SetDevice(device_) != KernelStatus::kOk) return DeviceError("selecting the GPU");
    Buffer buffer;
    if (gpu::DeviceAlloc(&buffer.address, bytes) != KernelStatus::kOk) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "allocating ", bytes, " bytes of GPU memory for a region: ", gpu::LastErrorText()));
    }
    if (gpu::ZeroDevice(buffer.address, bytes, nullptr) != KernelStatus::kOk ||
        gpu::StreamSynchronize(nullptr) != KernelStatus::kOk ||
        gpu::IpcExport(buffer.address, &buffer.ipc_handle) != KernelStatus::kOk) {
      const absl::Status error = DeviceError("preparing a region's GPU memory");
      gpu::DeviceFree(buffer.address);
      return error;
    }
    return buffer;
  }

  void Free(void* address) override { gpu::DeviceFree(address); }

  absl::StatusOr<void*> MapHost(void* host, int64_t bytes) override {
    void* device = nullptr;
    if (gpu::HostRegister(host, bytes, &device) != KernelStatus::kOk) {
      return DeviceError("registering a region's shared memory with the GPU");
    }
    return device;
  }

  void UnmapHost(void* host) override { gpu::HostUnregister(host); }

 private:
  const int device_;
  const std::string pci_bus_id_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RegionDevice>> CreateGpuRegionDevice(int device) {
  std::string bus_id;
  if (gpu::SetDevice(device) != KernelStatus::kOk ||
      gpu::PciBusId(device, &bus_id) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU ", device, " cannot serve co-located workers: ", gpu::LastErrorText()));
  }
  return std::make_unique<GpuRegionDevice>(device, std::move(bus_id));
}

#else

absl::StatusOr<std::unique_ptr<RegionDevice>> CreateGpuRegionDevice(int device) {
  return absl::FailedPreconditionError(
      absl::StrCat("GPU ", device,
                   ": this server was built without GPU support; co-located workers need a "
                   "build with CUDA or HIP"));
}

#endif

}  // namespace blocksel
