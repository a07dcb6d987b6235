// CPU backend benchmark: the machine's read bandwidth and fp32 FMA peak are
// measured first, in this process, then every selection shape is timed and
// reported beside its floor (bytes / measured bandwidth, FLOPs / measured
// peak). Key pools rotate over several copies larger than the last-level
// cache, so each iteration reads keys from memory.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/cpu_selector.h"
#include "kernels/cpu/thread_pool.h"

namespace blocksel {
namespace {

constexpr int64_t kRotationBytes = int64_t{512} << 20;  // beyond any L3 here

struct Floors {
  double read_bytes_per_second = 0;  // all threads
  double fma_flops_per_second = 0;   // all threads, fp32
};
Floors g_floors;

uint64_t NextRandom(uint64_t& state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// bf16 of a value in about [-2, 2): sign, exponent 126..127, random mantissa.
uint16_t RandomBf16(uint64_t& state) {
  const uint64_t r = NextRandom(state);
  return static_cast<uint16_t>(((r & 1) << 15) | ((126 + ((r >> 1) & 1)) << 7) | ((r >> 2) & 0x7F));
}

double MedianSeconds(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// Streaming read of a 1 GiB buffer with every thread, median of 7 passes.
double MeasureReadBandwidth(int threads) {
  const int64_t words = (int64_t{1} << 30) / 8;
  std::vector<uint64_t> buffer(words);
  uint64_t state = 1;
  for (uint64_t& word : buffer) word = NextRandom(state);
  cpu::ThreadPool pool(threads);
  std::vector<uint64_t> sums(threads);
  std::vector<double> samples;
  for (int pass = 0; pass < 7; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    pool.ParallelFor(threads, [&](int, int64_t t) {
      const int64_t begin = words * t / threads;
      const int64_t end = words * (t + 1) / threads;
      uint64_t lanes[8] = {};
      for (int64_t i = begin; i < end; i += 8) {
        for (int lane = 0; lane < 8; ++lane) lanes[lane] += buffer[i + lane];
      }
      sums[t] = std::accumulate(lanes, lanes + 8, uint64_t{0});
    });
    samples.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  benchmark::DoNotOptimize(sums);
  return static_cast<double>(words * 8) / MedianSeconds(samples);
}

// fp32 FMA throughput of one thread: 16 independent accumulator vectors.
// Built for AVX-512 (the ISA the page scorer uses) and run only where the
// CPU has it; elsewhere the portable loop gives the scalar-ISA peak.
__attribute__((target("avx512f"))) double FmaFlopsAvx512(int64_t iterations) {
  __m512 acc[16];
  for (int c = 0; c < 16; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f);
  const __m512 b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < 16; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 total = acc[0];
  for (int c = 1; c < 16; ++c) total = _mm512_add_ps(total, acc[c]);
  benchmark::DoNotOptimize(total);
  return 2.0 * 16 * 16 * static_cast<double>(iterations);
}

double FmaFlopsPortable(int64_t iterations) {
  float acc[16][16];
  for (int c = 0; c < 16; ++c) {
    for (int l = 0; l < 16; ++l) acc[c][l] = static_cast<float>(c + l) * 1e-3f;
  }
  for (int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < 16; ++c) {
      for (int l = 0; l < 16; ++l) acc[c][l] = acc[c][l] * 0.999999f + 1e-7f;
    }
  }
  benchmark::DoNotOptimize(acc);
  return 2.0 * 16 * 16 * static_cast<double>(iterations);
}

// All threads at once, median of 5 passes.
double MeasureFmaPeak(int threads) {
  cpu::ThreadPool pool(threads);
  constexpr int64_t kIterations = 20'000'000;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  std::vector<double> samples;
  double flops = 0;
  for (int pass = 0; pass < 5; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<double> per_thread(threads);
    pool.ParallelFor(threads, [&](int, int64_t t) {
      per_thread[t] = avx512 ? FmaFlopsAvx512(kIterations) : FmaFlopsPortable(kIterations / 16);
    });
    samples.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    flops = std::accumulate(per_thread.begin(), per_thread.end(), 0.0);
  }
  return flops / MedianSeconds(samples);
}

struct Workload {
  SelectionShape shape;
  std::vector<std::vector<uint8_t>> pools;  // rotating copies
  int64_t pages_per_pool = 0;
  std::vector<std::vector<int32_t>> tables;
  std::vector<RowSpan> spans;
  std::vector<uint16_t> queries;
  int32_t total_rows = 0;
  int64_t key_bytes_read = 0;  // per selection, each visible key once
  double flops = 0;
};

// requests x (sequence of `context` tokens, rows at positions
// first_position..). Pages are laid out contiguously per request.
Workload MakeWorkload(KeyDtype dtype, int requests, int64_t context, int32_t rows) {
  Workload w;
  w.shape.num_heads = 4;
  w.shape.head_dim = 128;
  w.shape.key_dtype = dtype;
  w.shape.topk = 16;
  w.shape.local_blocks = 1;
  const int64_t pages_per_request = (context + kBlockSize - 1) / kBlockSize;
  const int64_t page_bytes = int64_t{kBlockSize} * 128 * KeyDtypeBytes(dtype);
  w.pages_per_pool = pages_per_request * requests;
  const int64_t pool_bytes = w.pages_per_pool * page_bytes;
  const int copies = static_cast<int>(std::max<int64_t>(2, kRotationBytes / pool_bytes + 1));
  uint64_t state = 99;
  for (int c = 0; c < copies; ++c) {
    std::vector<uint8_t> pool(pool_bytes);
    if (dtype == KeyDtype::kBf16) {
      auto* values = reinterpret_cast<uint16_t*>(pool.data());
      for (int64_t i = 0; i < pool_bytes / 2; ++i) values[i] = RandomBf16(state);
    } else {
      for (uint8_t& byte : pool) byte = static_cast<uint8_t>(NextRandom(state) & 0x77);
    }
    w.pools.push_back(std::move(pool));
  }
  w.tables.resize(requests);
  for (int r = 0; r < requests; ++r) {
    for (int64_t p = 0; p < pages_per_request; ++p) {
      w.tables[r].push_back(static_cast<int32_t>(r * pages_per_request + p));
    }
    RowSpan span;
    span.block_table = w.tables[r].data();
    span.first_position = static_cast<int32_t>(context - rows);
    span.num_rows = rows;
    span.first_row = r * rows;
    w.spans.push_back(span);
  }
  w.total_rows = requests * rows;
  w.queries.resize(static_cast<size_t>(w.total_rows) * 4 * 128);
  for (uint16_t& q : w.queries) q = RandomBf16(state);
  w.key_bytes_read = requests * context * 128 * KeyDtypeBytes(dtype);
  const double prefix = static_cast<double>(context - rows);
  w.flops = 2.0 * 4 * 128 * requests * (rows * prefix + rows * (rows + 1) / 2.0);
  return w;
}

void RunSelection(benchmark::State& state, const Workload& w) {
  cpu::CpuSelector selector(0);
  std::vector<int32_t> out(static_cast<size_t>(4) * w.total_rows * 16);
  SelectionBatch batch;
  batch.num_pages = w.pages_per_pool;
  batch.spans = w.spans.data();
  batch.num_spans = static_cast<int32_t>(w.spans.size());
  batch.queries = w.queries.data();
  batch.total_rows = w.total_rows;
  batch.block_ids = out.data();
  size_t rotation = 0;
  for (auto _ : state) {
    batch.key_pool = w.pools[rotation++ % w.pools.size()].data();
    if (selector.Select(w.shape, batch) != KernelStatus::kOk) {
      state.SkipWithError("selection failed");
      return;
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * w.key_bytes_read);
  state.counters["key_MB"] = static_cast<double>(w.key_bytes_read) / 1e6;
  state.counters["GFLOP"] = w.flops / 1e9;
  state.counters["bw_floor_ms"] = 1e3 * w.key_bytes_read / g_floors.read_bytes_per_second;
  state.counters["flop_floor_ms"] = 1e3 * w.flops / g_floors.fma_flops_per_second;
  state.counters["pct_of_read_bw"] =
      benchmark::Counter(100.0 * w.key_bytes_read / g_floors.read_bytes_per_second,
                         benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_of_fma_peak"] =
      benchmark::Counter(100.0 * w.flops / g_floors.fma_flops_per_second,
                         benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(cpu::CpuSelector::isa(w.shape.head_dim));
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  using blocksel::KeyDtype;
  benchmark::Initialize(&argc, argv);
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double read_one = blocksel::MeasureReadBandwidth(1);
  blocksel::g_floors.read_bytes_per_second = blocksel::MeasureReadBandwidth(threads);
  blocksel::g_floors.fma_flops_per_second = blocksel::MeasureFmaPeak(threads);
  std::printf(
      "measured floors: streaming read %.1f GB/s (1 thread), %.1f GB/s (%d threads); "
      "fp32 FMA peak %.1f GFLOP/s (%d threads)\n",
      read_one / 1e9, blocksel::g_floors.read_bytes_per_second / 1e9, threads,
      blocksel::g_floors.fma_flops_per_second / 1e9, threads);

  static const blocksel::Workload decode_bf16 =
      blocksel::MakeWorkload(KeyDtype::kBf16, 8, 32768, 1);
  static const blocksel::Workload decode_fp8 =
      blocksel::MakeWorkload(KeyDtype::kFp8E4m3, 8, 32768, 1);
  static const blocksel::Workload spec_bf16 = blocksel::MakeWorkload(KeyDtype::kBf16, 8, 32768, 4);
  static const blocksel::Workload prefill_bf16 =
      blocksel::MakeWorkload(KeyDtype::kBf16, 1, 30720 + 2048, 2048);
  auto add = [](const char* name, const blocksel::Workload* w, int iterations) {
    auto* b = benchmark::RegisterBenchmark(
        name, [w](benchmark::State& s) { blocksel::RunSelection(s, *w); });
    b->Unit(benchmark::kMillisecond)->UseRealTime()->Repetitions(5)->ReportAggregatesOnly(true);
    if (iterations > 0) b->Iterations(iterations);
  };
  add("decode_bf16/B=8/L=32K/H=4/Q=1", &decode_bf16, 0);
  add("decode_fp8/B=8/L=32K/H=4/Q=1", &decode_fp8, 0);
  add("decode_bf16/B=8/L=32K/H=4/Q=4", &spec_bf16, 0);
  add("prefill_bf16/T=2K/P=30K/H=4", &prefill_bf16, 1);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
