// How fast the host can learn that a selection's GPU work is done, and what
// the host <-> device copies of one selection cost: the measurements behind
// the GPU backend's completion mechanism and upload layout.
//
// Each round submits what a decode selection submits: an upload of
// --upload_bytes from pinned memory, a one-CTA kernel (the selection's
// stand-in: the kernel's own time is not the question here), and a
// download of --download_bytes into pinned memory. The host then waits by
// one of:
//   sync        cudaStreamSynchronize (the runtime's default schedule)
//   event       an event recorded after the download, polled with
//               cudaEventQuery in a spin loop
//   flag        a 4-byte copy of the round's number into pinned memory
//               after the download, the host spinning on that word
// and the time from the first call of the round to the host seeing it done
// is recorded. A second table times host-to-device copies of several sizes
// (what a per-call upload of a padded query region or full block tables
// costs). Times are medians and 99th percentiles over --rounds rounds.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

#define CHECK(expr)                                                     \
  do {                                                                  \
    cudaError_t check_error = (expr);                                   \
    if (check_error != cudaSuccess) {                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(check_error));                    \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

__global__ void StandIn(const int32_t* input, int32_t* output, int32_t* round_out, int32_t round) {
  output[threadIdx.x] = input[threadIdx.x] + round;
  if (threadIdx.x == 0) *round_out = round;
}

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Stats {
  double p50 = 0;
  double p99 = 0;
};

Stats Summarize(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return {values[values.size() / 2], values[values.size() * 99 / 100]};
}

int Flag(const char* name, int fallback, int argc, char** argv) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      return std::atoi(argv[i] + prefix.size());
    }
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = Flag("rounds", 20000, argc, argv);
  const int upload_bytes = Flag("upload_bytes", 8192 + 2048, argc, argv);
  const int download_bytes = Flag("download_bytes", 2048, argc, argv);
  cudaDeviceProp properties;
  CHECK(cudaGetDeviceProperties(&properties, 0));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int max_copy = 4 << 20;
  void* host_in = nullptr;
  void* host_out = nullptr;
  int32_t* host_flag = nullptr;
  void* device_in = nullptr;
  void* device_out = nullptr;
  int32_t* device_round = nullptr;
  CHECK(cudaMallocHost(&host_in, max_copy));
  CHECK(cudaMallocHost(&host_out, max_copy));
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_flag), 4096));
  CHECK(cudaMalloc(&device_in, max_copy));
  CHECK(cudaMalloc(&device_out, max_copy));
  CHECK(cudaMalloc(reinterpret_cast<void**>(&device_round), 4096));
  std::memset(host_in, 1, max_copy);
  std::memset(host_out, 0, max_copy);
  cudaEvent_t done;
  CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  volatile int32_t* flag = host_flag;
  *flag = -1;

  std::printf("%s, %d SMs; upload %d B, download %d B, %d rounds each\n", properties.name,
              properties.multiProcessorCount, upload_bytes, download_bytes, rounds);
  std::printf("| wait | p50 us | p99 us |\n|---|---|---|\n");
  const char* waits[] = {"sync", "event", "flag"};
  for (int wait = 0; wait < 3; ++wait) {
    std::vector<double> latency;
    latency.reserve(rounds);
    for (int round = 0; round < rounds + rounds / 10; ++round) {
      const double start = NowUs();
      CHECK(cudaMemcpyAsync(device_in, host_in, upload_bytes, cudaMemcpyHostToDevice, stream));
      StandIn<<<1, 32, 0, stream>>>(static_cast<const int32_t*>(device_in),
                                    static_cast<int32_t*>(device_out), device_round, round);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpyAsync(host_out, device_out, download_bytes, cudaMemcpyDeviceToHost, stream));
      if (wait == 0) {
        CHECK(cudaStreamSynchronize(stream));
      } else if (wait == 1) {
        CHECK(cudaEventRecord(done, stream));
        cudaError_t state;
        while ((state = cudaEventQuery(done)) == cudaErrorNotReady) {
        }
        CHECK(state);
      } else {
        // The kernel wrote the round's number; it comes back into the
        // pinned flag after the download, in stream order.
        CHECK(cudaMemcpyAsync(host_flag, device_round, 4, cudaMemcpyDeviceToHost, stream));
        while (*flag != round) {
        }
        std::atomic_thread_fence(std::memory_order_acquire);
      }
      const double end = NowUs();
      if (round >= rounds / 10) latency.push_back(end - start);
    }
    CHECK(cudaStreamSynchronize(stream));
    if (static_cast<int32_t*>(host_out)[0] != 0x01010101 + rounds + rounds / 10 - 1) {
      std::fprintf(stderr, "the last round's result did not arrive\n");
      return 1;
    }
    const Stats stats = Summarize(latency);
    std::printf("| %s | %.1f | %.1f |\n", waits[wait], stats.p50, stats.p99);
  }

  std::printf("\nhost-to-device copy from pinned memory, then cudaStreamSynchronize\n");
  std::printf("| bytes | p50 us | p99 us |\n|---|---|---|\n");
  for (int bytes : {1024, 8192, 65536, 262144, 1 << 20, 4 << 20}) {
    std::vector<double> latency;
    for (int round = 0; round < 2000; ++round) {
      const double start = NowUs();
      CHECK(cudaMemcpyAsync(device_in, host_in, bytes, cudaMemcpyHostToDevice, stream));
      CHECK(cudaStreamSynchronize(stream));
      if (round >= 200) latency.push_back(NowUs() - start);
    }
    const Stats stats = Summarize(latency);
    std::printf("| %d | %.1f | %.1f |\n", bytes, stats.p50, stats.p99);
  }
  return 0;
}
