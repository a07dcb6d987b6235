// GPU selection benchmark. First measures the card's streaming read
// bandwidth (a read-only kernel over 4 GiB) and its bf16 matrix peak
// (cuBLAS, 8192^3), then times every decode and prefill shape of
// PERFORMANCE.md. Decode runs as CUDA-graph replays queued back to back,
// one graph per copy of the key pool, rotating over copies larger than L2;
// each shape reports the median replay, its bandwidth and the floor bytes /
// measured bandwidth.
// Prefill is timed with events around direct launches.
//
//   gpu_selection_bench [FILTER] [--json_out=PATH] [--decode_splits=N] [--prefill_splits=N]
//
// FILTER: only shapes whose name contains it. --json_out: every figure as
// JSON (the device, the floors, one record per shape), which
// bench/compare_with_peer.py joins with the peer's figures from the same
// call into bench/RESULTS.md's table. --decode_splits: the decode CTA
// count instead of DecodeSplits(device); --prefill_splits: the prefill key
// split instead of the plan's (both to tune them).
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/gpu/gpu_compat.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel {
namespace {

#define CHECK_CUDA(expr)                                                \
  do {                                                                  \
    const cudaError_t error_ = (expr);                                  \
    if (error_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(error_));                         \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

__global__ void ReadKernel(const uint4* data, int64_t count, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = data[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads alive
}

__global__ void FillKernel(uint16_t* data, int64_t count, uint32_t seed, bool fp8) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    // bf16 in about [-2, 2); as fp8 bytes, two finite e4m3 values.
    data[i] = fp8 ? static_cast<uint16_t>(x & 0x7777u)
                  : static_cast<uint16_t>(((x & 1u) << 15) | ((126u + ((x >> 1) & 1u)) << 7) |
                                          ((x >> 2) & 0x7Fu));
  }
}

float Median(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

double MeasureReadBandwidth(cudaStream_t stream) {
  const int64_t bytes = int64_t{4} << 30;
  void* buffer;
  uint32_t* sink;
  CHECK_CUDA(cudaMalloc(&buffer, bytes));
  CHECK_CUDA(cudaMalloc(&sink, 4));
  CHECK_CUDA(cudaMemsetAsync(buffer, 1, bytes, stream));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < 12; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    ReadKernel<<<132 * 16, 512, 0, stream>>>(static_cast<const uint4*>(buffer), bytes / 16, sink);
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2) times.push_back(ms);
  }
  CHECK_CUDA(cudaFree(buffer));
  CHECK_CUDA(cudaFree(sink));
  return bytes / (Median(times) * 1e-3);
}

double MeasureMatrixPeak(cudaStream_t stream) {
  const int n = 8192;
  void *a, *b, *c;
  CHECK_CUDA(cudaMalloc(&a, int64_t{n} * n * 2));
  CHECK_CUDA(cudaMalloc(&b, int64_t{n} * n * 2));
  CHECK_CUDA(cudaMalloc(&c, int64_t{n} * n * 2));
  FillKernel<<<1024, 256, 0, stream>>>(static_cast<uint16_t*>(a), int64_t{n} * n, 1, false);
  FillKernel<<<1024, 256, 0, stream>>>(static_cast<uint16_t*>(b), int64_t{n} * n, 2, false);
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) return 0;
  cublasSetStream(handle, stream);
  const float alpha = 1, beta = 0;
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < 8; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                 CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2) times.push_back(ms);
  }
  cublasDestroy(handle);
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  CHECK_CUDA(cudaFree(c));
  return 2.0 * n * n * double(n) / (Median(times) * 1e-3);
}

// Median GPU time of one replay(i), i = 0, 1, ..., in microseconds.
// Replays are queued back to back with an event between each two, and
// synchronized once: every interval is one replay's GPU time with the queue
// full, not the host's launch latency. The first `warm_up` replays are not
// timed; they must cover every graph replay(i) uses, since the first launch
// of a graph also uploads it.
template <typename Replay>
double MedianReplayMicros(Replay replay, int warm_up, cudaStream_t stream) {
  for (int i = 0; i < warm_up; ++i) replay(i);
  constexpr int kReplays = 200;
  std::vector<cudaEvent_t> marks(kReplays + 1);
  for (cudaEvent_t& mark : marks) CHECK_CUDA(cudaEventCreate(&mark));
  CHECK_CUDA(cudaEventRecord(marks[0], stream));
  for (int i = 0; i < kReplays; ++i) {
    replay(i);
    CHECK_CUDA(cudaEventRecord(marks[i + 1], stream));
  }
  CHECK_CUDA(cudaEventSynchronize(marks[kReplays]));
  std::vector<float> times;
  for (int i = 0; i < kReplays; ++i) {
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, marks[i], marks[i + 1]));
    times.push_back(ms);
  }
  for (cudaEvent_t& mark : marks) CHECK_CUDA(cudaEventDestroy(mark));
  return Median(times) * 1e3;
}

__global__ void EmptyKernel() {}

// The floor of a small decode: one replay of a graph of `kernels` empty
// one-CTA kernels, timed like the decode graphs.
double MeasureGraphFloor(int kernels, cudaStream_t stream) {
  gpu::CapturedGraph graph;
  if (graph.BeginCapture(stream) != KernelStatus::kOk) return 0;
  for (int k = 0; k < kernels; ++k) EmptyKernel<<<1, 32, 0, stream>>>();
  if (graph.EndCapture(stream) != KernelStatus::kOk) return 0;
  return MedianReplayMicros([&](int) { (void)graph.Replay(stream); }, 20, stream);
}

struct Shape {
  const char* name;
  int batch;
  int64_t context;  // tokens per sequence (L, or P + T)
  int rows;         // Q (decode) or T (prefill)
  KeyDtype dtype;
  bool decode;
};

// One measured shape, for the JSON.
struct Record {
  std::string name;
  bool decode;
  int batch;
  int64_t context;
  int rows;
  KeyDtype dtype;
  double us;
  double floor_us;
  int32_t key_splits;
};

SelectionShape M3(KeyDtype dtype) {
  SelectionShape shape;
  shape.num_heads = 4;
  shape.head_dim = 128;
  shape.key_dtype = dtype;
  shape.topk = 16;
  shape.local_blocks = 1;
  return shape;
}

void RunShape(const Shape& s, const gpu::DeviceInfo& device, double read_bw, double peak,
              int32_t decode_splits, int32_t prefill_splits, cudaStream_t stream,
              std::vector<Record>* records) {
  const SelectionShape shape = M3(s.dtype);
  const int64_t blocks_per_seq = (s.context + kBlockSize - 1) / kBlockSize;
  const int64_t pages = blocks_per_seq * s.batch;
  const int64_t page_bytes = int64_t{kBlockSize} * 128 * KeyDtypeBytes(s.dtype);
  const int64_t pool_bytes = pages * page_bytes;
  const int copies = static_cast<int>(std::max<int64_t>(1, (int64_t{256} << 20) / pool_bytes + 1));
  std::vector<void*> pools(copies);
  for (void*& pool : pools) {
    CHECK_CUDA(cudaMalloc(&pool, pool_bytes));
    FillKernel<<<1024, 256, 0, stream>>>(static_cast<uint16_t*>(pool), pool_bytes / 2, 7,
                                         s.dtype == KeyDtype::kFp8E4m3);
  }
  // Shuffled page order: the pool is paged, not contiguous per sequence.
  std::vector<int32_t> table(pages);
  for (int64_t i = 0; i < pages; ++i) table[i] = static_cast<int32_t>(i);
  std::shuffle(table.begin(), table.end(), std::mt19937(3));
  std::vector<gpu::DeviceSpan> spans(s.batch);
  for (int b = 0; b < s.batch; ++b) {
    spans[b] = {static_cast<int32_t>(s.context - s.rows), s.rows, b * s.rows,
                static_cast<int32_t>(b * blocks_per_seq)};
  }
  const int64_t rows = int64_t{s.batch} * s.rows;
  void *table_d, *spans_d, *queries_d, *out_d, *workspace_d;
  CHECK_CUDA(cudaMalloc(&table_d, pages * 4));
  CHECK_CUDA(cudaMalloc(&spans_d, s.batch * sizeof(gpu::DeviceSpan)));
  CHECK_CUDA(cudaMalloc(&queries_d, rows * 4 * 128 * 2));
  CHECK_CUDA(cudaMalloc(&out_d, rows * 4 * 16 * 4));
  // The plan the server would make, and for prefill also the unsplit
  // kernel (the baseline).
  gpu::BatchDims dims;
  for (const gpu::DeviceSpan& span : spans) {
    gpu::AddSpan(shape, span.first_position, span.num_rows, &dims);
  }
  gpu::PlanOptions options;
  options.force_path = true;
  options.path = s.decode ? gpu::KernelPath::kDecode : gpu::KernelPath::kPrefill;
  gpu::SelectionPlan plan;
  gpu::SelectionPlan unsplit;
  options.splits = s.decode ? decode_splits : 1;
  if (gpu::Plan(shape, dims, device, options, &unsplit) != KernelStatus::kOk) {
    std::printf("%-34s no plan\n", s.name);
    return;
  }
  options.splits = s.decode ? decode_splits : prefill_splits;
  if (gpu::Plan(shape, dims, device, options, &plan) != KernelStatus::kOk) {
    std::printf("%-34s no plan\n", s.name);
    return;
  }
  const int64_t workspace_bytes = std::max(plan.workspace_bytes, unsplit.workspace_bytes);
  CHECK_CUDA(cudaMalloc(&workspace_d, std::max<int64_t>(workspace_bytes, 16)));
  CHECK_CUDA(cudaMemsetAsync(workspace_d, 0, workspace_bytes, stream));  // decode's counters
  CHECK_CUDA(cudaMemcpyAsync(table_d, table.data(), pages * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(spans_d, spans.data(), s.batch * sizeof(gpu::DeviceSpan),
                             cudaMemcpyHostToDevice, stream));
  FillKernel<<<256, 256, 0, stream>>>(static_cast<uint16_t*>(queries_d), rows * 4 * 128, 9, false);
  CHECK_CUDA(cudaStreamSynchronize(stream));

  gpu::DeviceBatch batch;
  batch.num_pages = pages;
  batch.block_table = static_cast<const int32_t*>(table_d);
  batch.spans = static_cast<const gpu::DeviceSpan*>(spans_d);
  batch.num_spans = s.batch;
  batch.queries = static_cast<const uint16_t*>(queries_d);
  batch.total_rows = static_cast<int32_t>(rows);
  batch.block_ids = static_cast<int32_t*>(out_d);
  batch.workspace = workspace_d;
  batch.workspace_bytes = workspace_bytes;

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> times;
  const int64_t key_bytes = int64_t{s.batch} * s.context * 128 * KeyDtypeBytes(s.dtype);
  const double prefix = static_cast<double>(s.context - s.rows);
  const double flops = 2.0 * 4 * 128 * s.batch * (s.rows * prefix + s.rows * (s.rows + 1) / 2.0);
  if (s.decode) {
    std::vector<gpu::CapturedGraph> graphs(copies);
    for (int c = 0; c < copies; ++c) {
      batch.key_pool = pools[c];
      if (gpu::Select(plan, batch, stream) != KernelStatus::kOk) {
        std::printf("%-34s launch failed: %s\n", s.name, gpu::LastErrorText());
        return;
      }
      CHECK_CUDA(cudaStreamSynchronize(stream));
      if (graphs[c].BeginCapture(stream) != KernelStatus::kOk ||
          gpu::Select(plan, batch, stream) != KernelStatus::kOk ||
          graphs[c].EndCapture(stream) != KernelStatus::kOk) {
        std::printf("%-34s capture failed: %s\n", s.name, gpu::LastErrorText());
        return;
      }
    }
    const double us = MedianReplayMicros([&](int i) { (void)graphs[i % copies].Replay(stream); },
                                         copies + 20, stream);
    const double floor_us = key_bytes / read_bw * 1e6;
    std::printf("%-34s %9.1f us %7.0f GB/s  floor %7.1f us (%5.1f%%)\n", s.name, us,
                key_bytes / (us * 1e-6) / 1e9, floor_us, 100.0 * floor_us / us);
    records->push_back({s.name, true, s.batch, s.context, s.rows, s.dtype, us, floor_us, 1});
  } else {
    // The unsplit kernel first (the baseline), then the key split the
    // backend would choose, when it chooses one.
    for (const gpu::SelectionPlan* run : {&unsplit, &plan}) {
      const int32_t split = run->splits;
      times.clear();
      for (int i = 0; i < 7; ++i) {
        // Rotate pools so every run reads its keys from memory, not L2.
        batch.key_pool = pools[i % copies];
        CHECK_CUDA(cudaEventRecord(start, stream));
        if (gpu::Select(*run, batch, stream) != KernelStatus::kOk) {
          std::printf("%-34s launch failed: %s\n", s.name, gpu::LastErrorText());
          return;
        }
        CHECK_CUDA(cudaEventRecord(stop, stream));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        if (i >= 2) times.push_back(ms);
      }
      const double us = Median(times) * 1e3;
      const double floor_us = flops / peak * 1e6;
      std::printf("%-34s %9.1f us %7.1f TFLOP/s  floor %7.1f us (%5.1f%%)  key splits %d\n", s.name,
                  us, flops / (us * 1e-6) / 1e12, floor_us, 100.0 * floor_us / us, split);
      records->push_back({s.name, false, s.batch, s.context, s.rows, s.dtype, us, floor_us, split});
      if (plan.splits == 1) break;
    }
  }
  for (void* pool : pools) CHECK_CUDA(cudaFree(pool));
  CHECK_CUDA(cudaFree(table_d));
  CHECK_CUDA(cudaFree(spans_d));
  CHECK_CUDA(cudaFree(queries_d));
  CHECK_CUDA(cudaFree(out_d));
  CHECK_CUDA(cudaFree(workspace_d));
}

bool WriteJson(const std::string& path, const gpu::DeviceInfo& device, double read_bw, double peak,
               double one_kernel_us, double two_kernels_us, const std::vector<Record>& records) {
  FILE* file = std::fopen(path.c_str(), "w");
  if (file == nullptr) return false;
  std::fprintf(file,
               "{\n \"device\": \"%s\",\n \"multiprocessors\": %d,\n \"read_gbps\": %.1f,\n"
               " \"bf16_tflops\": %.1f,\n \"graph_floor_us\": [%.2f, %.2f],\n \"shapes\": [",
               device.name.c_str(), device.multiprocessors, read_bw / 1e9, peak / 1e12,
               one_kernel_us, two_kernels_us);
  for (size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    std::fprintf(file,
                 "%s\n  {\"name\": \"%s\", \"kind\": \"%s\", \"dtype\": \"%s\", \"batch\": %d, "
                 "\"context\": %lld, \"rows\": %d, \"us\": %.2f, \"floor_us\": %.2f, "
                 "\"key_splits\": %d}",
                 i == 0 ? "" : ",", r.name.c_str(), r.decode ? "decode" : "prefill",
                 r.dtype == KeyDtype::kBf16 ? "bf16" : "fp8", r.batch,
                 static_cast<long long>(r.context), r.rows, r.us, r.floor_us, r.key_splits);
  }
  std::fprintf(file, "\n ]\n}\n");
  return std::fclose(file) == 0;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  using blocksel::KeyDtype;
  std::string filter;
  std::string json_out;
  int32_t decode_splits = 0;
  int32_t prefill_splits = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--json_out=", 0) == 0) {
      json_out = arg.substr(11);
    } else if (arg.rfind("--decode_splits=", 0) == 0) {
      decode_splits = std::atoi(arg.c_str() + 16);
    } else if (arg.rfind("--prefill_splits=", 0) == 0) {
      prefill_splits = std::atoi(arg.c_str() + 17);
    } else {
      filter = arg;
    }
  }
  if (blocksel::gpu::DeviceCount() == 0) {
    std::printf("no GPU device\n");
    return 1;
  }
  blocksel::gpu::DeviceInfo device;
  blocksel::gpu::QueryDevice(0, &device);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double read_bw = blocksel::MeasureReadBandwidth(stream);
  const double peak = blocksel::MeasureMatrixPeak(stream);
  std::printf(
      "device %s, %d SMs; measured streaming read %.0f GB/s, bf16 matrix peak %.0f TFLOP/s\n",
      device.name.c_str(), device.multiprocessors, read_bw / 1e9, peak / 1e12);
  const double one_kernel_us = blocksel::MeasureGraphFloor(1, stream);
  const double two_kernels_us = blocksel::MeasureGraphFloor(2, stream);
  std::printf("graph replay floor: 1 empty kernel %.1f us, 2 empty kernels %.1f us\n",
              one_kernel_us, two_kernels_us);
  const blocksel::Shape shapes[] = {
      {"decode bf16 B=1 L=8K Q=1", 1, 8192, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=1 L=128K Q=1", 1, 131072, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=1 L=32K Q=1", 1, 32768, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=8 L=32K Q=1", 8, 32768, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=32 L=128K Q=1", 32, 131072, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=64 L=32K Q=1", 64, 32768, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=256 L=8K Q=1", 256, 8192, 1, KeyDtype::kBf16, true},
      {"decode bf16 B=32 L=128K Q=4", 32, 131072, 4, KeyDtype::kBf16, true},
      {"decode bf16 B=4 L=1M Q=1", 4, 1048576, 1, KeyDtype::kBf16, true},
      {"decode fp8 B=32 L=128K Q=1", 32, 131072, 1, KeyDtype::kFp8E4m3, true},
      {"prefill bf16 T=8K P=0", 1, 8192, 8192, KeyDtype::kBf16, false},
      {"prefill bf16 T=8K P=120K", 1, 131072, 8192, KeyDtype::kBf16, false},
      {"prefill bf16 T=32K P=0", 1, 32768, 32768, KeyDtype::kBf16, false},
      {"prefill fp8 T=8K P=120K", 1, 131072, 8192, KeyDtype::kFp8E4m3, false},
      // Late chunks of a long prompt: few query tiles, long prefix (the
      // key split's case).
      {"prefill bf16 T=512 P=128K", 1, 131584, 512, KeyDtype::kBf16, false},
      {"prefill bf16 T=2K P=256K", 1, 264192, 2048, KeyDtype::kBf16, false},
  };
  std::vector<blocksel::Record> records;
  for (const blocksel::Shape& shape : shapes) {
    if (std::string(shape.name).find(filter) == std::string::npos) continue;
    blocksel::RunShape(shape, device, read_bw, peak, decode_splits, prefill_splits, stream,
                       &records);
  }
  if (!json_out.empty() && !blocksel::WriteJson(json_out, device, read_bw, peak, one_kernel_us,
                                                two_kernels_us, records)) {
    std::printf("cannot write %s\n", json_out.c_str());
    return 1;
  }
  return 0;
}
