// Uses the installed libraries the way outside programs do: the client
// library (encoders, the reference, a call to a server that is not there,
// which must fail cleanly, not hang) and the kernel library in process (a
// CPU selection checked against the reference; the GPU kernels' limits when
// the package carries them).
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/reference_selection.h"
#include "client/routed_client.h"
#include "kernels/cpu/cpu_selector.h"
#if defined(BLOCKSEL_HAVE_GPU)
#include "kernels/gpu/gpu_selection.h"
#endif

namespace {

// One decode row at position 1000 over an 8-page sequence, M3's shape.
bool SelectsInProcess() {
  blocksel::SelectionShape shape;
  shape.num_heads = 4;
  shape.head_dim = 128;
  shape.topk = 4;
  shape.local_blocks = 1;
  constexpr int32_t kPages = 8;
  constexpr int32_t kPosition = 1000;
  std::mt19937 random(7);
  std::normal_distribution<float> normal;
  std::vector<float> keys(int64_t{kPages} * blocksel::kBlockSize * shape.head_dim);
  std::vector<float> queries(int64_t{shape.num_heads} * shape.head_dim);
  for (float& key : keys) key = normal(random);
  for (float& query : queries) query = normal(random);
  // bf16 bytes for the kernel; the reference gets the same values.
  const std::string pool = blocksel::EncodeBf16(keys);
  const std::string query_bytes = blocksel::EncodeBf16(queries);
  keys = blocksel::DecodeBf16(pool);
  queries = blocksel::DecodeBf16(query_bytes);
  std::vector<int32_t> table(kPages);
  for (int32_t page = 0; page < kPages; ++page) table[page] = page;
  blocksel::RowSpan span;
  span.block_table = table.data();
  span.first_position = kPosition;
  span.num_rows = 1;
  blocksel::SelectionBatch batch;
  batch.key_pool = pool.data();
  batch.num_pages = kPages;
  batch.spans = &span;
  batch.num_spans = 1;
  batch.queries = reinterpret_cast<const uint16_t*>(query_bytes.data());
  batch.total_rows = 1;
  std::vector<int32_t> ids(int64_t{shape.num_heads} * shape.topk);
  batch.block_ids = ids.data();
  blocksel::cpu::CpuSelector selector(1);
  if (selector.Select(shape, batch) != blocksel::KernelStatus::kOk) return false;
  blocksel::ReferenceRows rows;
  rows.keys = keys.data();
  rows.first_position = kPosition;
  rows.num_rows = 1;
  return ids == blocksel::ReferenceSelect(shape, {rows}, queries.data());
}

}  // namespace

int main() {
  const std::vector<float> values = {1.0f, -2.5f, 0.125f};
  if (blocksel::DecodeBf16(blocksel::EncodeBf16(values)) != values) {
    std::fprintf(stderr, "bf16 round trip failed\n");
    return 1;
  }
  blocksel::ClientOptions options;
  options.timeout = absl::Seconds(2);
  options.max_attempts = 1;
  blocksel::RoutedClient client({"unix:/nonexistent/blocksel.sock"}, options);
  const absl::StatusOr<blocksel::v1::GetInfoResponse> info = client.server(0).GetInfo();
  if (info.ok() || !absl::IsUnavailable(info.status())) {
    std::fprintf(stderr, "expected UNAVAILABLE, got %s\n", info.status().ToString().c_str());
    return 1;
  }
  if (!SelectsInProcess()) {
    std::fprintf(stderr, "the in-process CPU selection differs from the reference\n");
    return 1;
  }
#if defined(BLOCKSEL_HAVE_GPU)
  blocksel::SelectionShape m3;
  m3.num_heads = 4;
  m3.head_dim = 128;
  m3.topk = 16;
  m3.local_blocks = 1;
  std::string reason;
  if (!blocksel::gpu::SupportsShape(m3, &reason)) {
    std::fprintf(stderr, "the GPU kernels refuse M3: %s\n", reason.c_str());
    return 1;
  }
  std::printf("consumer: GPU kernels linked, %d device(s)\n", blocksel::gpu::DeviceCount());
#endif
  std::printf(
      "consumer: linked blocksel::blocksel_client and blocksel::kernels; an absent server is "
      "UNAVAILABLE; an in-process selection equals the reference\n");
  return 0;
}
