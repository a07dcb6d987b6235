// The runtime calls of gpu_selection.h: device discovery, memory, streams
// and graphs, each returning a KernelStatus.
#include <cstring>
#include <string>

#include "kernels/gpu/gpu_compat.h"
#if !defined(BLOCKSEL_GPU_HIP)
#include <cuda.h>
#endif
#include "kernels/gpu/gpu_selection.h"

namespace blocksel::gpu {
namespace {

thread_local gpuError_t last_error = gpuSuccess;

KernelStatus Check(gpuError_t error) {
  if (error == gpuSuccess) return KernelStatus::kOk;
  last_error = error;
  // The runtime keeps a failed call's error as its "last error" too, which
  // the next launch's check would report as its own: it is reported here.
  (void)gpuGetLastError();
  return KernelStatus::kDeviceError;
}

}  // namespace

int DeviceCount() {
  int count = 0;
  if (gpuGetDeviceCount(&count) != gpuSuccess) {
    (void)gpuGetLastError();  // no driver or no device: not an error here
    return 0;
  }
  return count;
}

KernelStatus QueryDevice(int device, DeviceInfo* info) {
  gpuDeviceProp_t properties;
  const KernelStatus status = Check(gpuGetDeviceProperties(&properties, device));
  if (status != KernelStatus::kOk) return status;
  info->name = properties.name;
  info->multiprocessors = properties.multiProcessorCount;
  info->compute_major = properties.major;
  info->compute_minor = properties.minor;
  info->total_memory = static_cast<int64_t>(properties.totalGlobalMem);
  info->warp_size = properties.warpSize;
  info->max_shared_bytes_per_cta = static_cast<int64_t>(gpuSharedMemPerBlockOptin(properties));
  return KernelStatus::kOk;
}

KernelStatus SetDevice(int device) { return Check(gpuSetDevice(device)); }

KernelStatus PciBusId(int device, std::string* bus_id) {
  char text[32] = {};
  const KernelStatus status = Check(gpuDeviceGetPCIBusId(text, sizeof(text), device));
  if (status == KernelStatus::kOk) *bus_id = text;
  return status;
}

KernelStatus DeviceByPciBusId(const std::string& bus_id, int* device) {
  return Check(gpuDeviceGetByPCIBusId(device, bus_id.c_str()));
}

KernelStatus CanAccessPeer(int device, int peer, bool* can) {
  if (device == peer) {
    *can = true;
    return KernelStatus::kOk;
  }
  int reaches = 0;
  const KernelStatus status = Check(gpuDeviceCanAccessPeer(&reaches, device, peer));
  *can = reaches != 0;
  return status;
}

const char* LastErrorText() { return gpuGetErrorString(last_error); }

KernelStatus DeviceAlloc(void** pointer, int64_t bytes) {
  return Check(gpuMalloc(pointer, static_cast<size_t>(bytes)));
}

void DeviceFree(void* pointer) {
  if (pointer != nullptr) (void)gpuFree(pointer);
}

KernelStatus PinnedAlloc(void** pointer, int64_t bytes) {
  return Check(gpuHostAlloc(pointer, static_cast<size_t>(bytes), gpuHostAllocMapped));
}

KernelStatus DevicePointerOf(void* pinned, void** device) {
  return Check(gpuHostGetDevicePointer(device, pinned, 0));
}

void PinnedFree(void* pointer) {
  if (pointer != nullptr) (void)gpuFreeHost(pointer);
}

KernelStatus StreamCreate(void** stream) {
  gpuStream_t created;
  const KernelStatus status = Check(gpuStreamCreateWithFlags(&created, gpuStreamNonBlocking));
  *stream = created;
  return status;
}

void StreamDestroy(void* stream) {
  if (stream != nullptr) (void)gpuStreamDestroy(static_cast<gpuStream_t>(stream));
}

KernelStatus StreamSynchronize(void* stream) {
  return Check(gpuStreamSynchronize(static_cast<gpuStream_t>(stream)));
}

KernelStatus CopyHostToDevice(void* device, const void* host, int64_t bytes, void* stream) {
  return Check(gpuMemcpyAsync(device, host, static_cast<size_t>(bytes), gpuMemcpyHostToDevice,
                              static_cast<gpuStream_t>(stream)));
}

KernelStatus CopyDeviceToHost(void* host, const void* device, int64_t bytes, void* stream) {
  return Check(gpuMemcpyAsync(host, device, static_cast<size_t>(bytes), gpuMemcpyDeviceToHost,
                              static_cast<gpuStream_t>(stream)));
}

#if defined(BLOCKSEL_GPU_HIP)

KernelStatus StreamWaitWord(void* stream, const uint32_t* word, uint32_t value) {
  return Check(hipStreamWaitValue32(static_cast<hipStream_t>(stream), const_cast<uint32_t*>(word),
                                    value, hipStreamWaitValueEq, 0xFFFFFFFFu));
}

#else

// The runtime has no call for a stream's wait on a word; the driver's is
// looked up once through the runtime, so nothing links the driver library.
KernelStatus StreamWaitWord(void* stream, const uint32_t* word, uint32_t value) {
  using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  static WaitValue wait_value = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &function, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<WaitValue>(nullptr);
    }
    return reinterpret_cast<WaitValue>(function);
  }();
  if (wait_value == nullptr) return KernelStatus::kUnsupported;
  return wait_value(static_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(word), value,
                    CU_STREAM_WAIT_VALUE_EQ) == CUDA_SUCCESS
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

#endif

KernelStatus HostRegister(void* host, int64_t bytes, void** device) {
  KernelStatus status =
      Check(gpuHostRegister(host, static_cast<size_t>(bytes), gpuHostRegisterMapped));
  if (status != KernelStatus::kOk) return status;
  status = Check(gpuHostGetDevicePointer(device, host, 0));
  if (status != KernelStatus::kOk) (void)gpuHostUnregister(host);
  return status;
}

void HostUnregister(void* host) {
  if (host != nullptr) (void)gpuHostUnregister(host);
}

static_assert(sizeof(gpuIpcMemHandle_t) == kIpcHandleBytes);

KernelStatus IpcExport(void* device, std::string* handle) {
  gpuIpcMemHandle_t exported;
  const KernelStatus status = Check(gpuIpcGetMemHandle(&exported, device));
  if (status == KernelStatus::kOk) handle->assign(exported.reserved, sizeof(exported.reserved));
  return status;
}

KernelStatus IpcOpen(const std::string& handle, void** device) {
  if (handle.size() != kIpcHandleBytes) return KernelStatus::kInvalidArgument;
  gpuIpcMemHandle_t opened;
  std::memcpy(opened.reserved, handle.data(), sizeof(opened.reserved));
  return Check(gpuIpcOpenMemHandle(device, opened, gpuIpcMemLazyEnablePeerAccess));
}

void IpcClose(void* device) {
  if (device != nullptr) (void)gpuIpcCloseMemHandle(device);
}

KernelStatus ZeroDevice(void* device, int64_t bytes, void* stream) {
  return Check(
      gpuMemsetAsync(device, 0, static_cast<size_t>(bytes), static_cast<gpuStream_t>(stream)));
}

KernelStatus EventCreate(void** event) {
  gpuEvent_t created;
  const KernelStatus status = Check(gpuEventCreate(&created));
  *event = status == KernelStatus::kOk ? created : nullptr;
  return status;
}

void EventDestroy(void* event) {
  if (event != nullptr) (void)gpuEventDestroy(static_cast<gpuEvent_t>(event));
}

KernelStatus EventRecord(void* event, void* stream) {
  return Check(gpuEventRecord(static_cast<gpuEvent_t>(event), static_cast<gpuStream_t>(stream)));
}

KernelStatus EventQuery(void* event, bool* done) {
  const gpuError_t error = gpuEventQuery(static_cast<gpuEvent_t>(event));
  *done = error == gpuSuccess;
  if (error == gpuErrorNotReady) {
    (void)gpuGetLastError();  // not an error: the work is still running
    return KernelStatus::kOk;
  }
  return Check(error);
}

KernelStatus EventSynchronize(void* event) {
  return Check(gpuEventSynchronize(static_cast<gpuEvent_t>(event)));
}

KernelStatus EventElapsedSeconds(void* start, void* end, double* seconds) {
  float milliseconds = 0;
  const KernelStatus status = Check(gpuEventElapsedTime(
      &milliseconds, static_cast<gpuEvent_t>(start), static_cast<gpuEvent_t>(end)));
  *seconds = static_cast<double>(milliseconds) * 1e-3;
  return status;
}

CapturedGraph::~CapturedGraph() {
  if (exec_ != nullptr) (void)gpuGraphExecDestroy(static_cast<gpuGraphExec_t>(exec_));
  if (graph_ != nullptr) (void)gpuGraphDestroy(static_cast<gpuGraph_t>(graph_));
}

KernelStatus CapturedGraph::BeginCapture(void* stream) {
  return Check(
      gpuStreamBeginCapture(static_cast<gpuStream_t>(stream), gpuStreamCaptureModeThreadLocal));
}

KernelStatus CapturedGraph::EndCapture(void* stream) {
  gpuGraph_t graph;
  KernelStatus status = Check(gpuStreamEndCapture(static_cast<gpuStream_t>(stream), &graph));
  if (status != KernelStatus::kOk) return status;
  graph_ = graph;
  gpuGraphExec_t exec;
  status = Check(gpuGraphInstantiate(&exec, graph));
  if (status == KernelStatus::kOk) exec_ = exec;
  return status;
}

KernelStatus CapturedGraph::Replay(void* stream) {
  return Check(
      gpuGraphLaunch(static_cast<gpuGraphExec_t>(exec_), static_cast<gpuStream_t>(stream)));
}

}  // namespace blocksel::gpu
