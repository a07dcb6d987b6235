// The GPU plan's host-side choices: the prefill key split for a batch's
// tile work. Needs no GPU.
#include <cstdint>

#include "gtest/gtest.h"
#include "kernels/gpu/gpu_selection.h"
#include "tests/support/random_batch.h"

namespace blocksel {
namespace {

using testing::M3Shape;

gpu::DeviceInfo H200Like() {
  gpu::DeviceInfo device;
  device.name = "test device";
  device.multiprocessors = 132;
  device.max_shared_bytes_per_cta = int64_t{227} * 1024;
  return device;
}

gpu::BatchDims OneChunk(int64_t prefix, int32_t rows) {
  gpu::BatchDims dims;
  gpu::AddSpan(M3Shape(), prefix, rows, &dims);
  return dims;
}

TEST(SelectionPlan, CountsTheBlocksEveryPrefillTileSees) {
  // H = 4: a tile holds 32 rows, so of a causal chunk from position 0 four
  // tiles see each block count from 1 to the chunk's last.
  EXPECT_EQ(OneChunk(0, 8192).prefill_tile_blocks, 4 * (64 * 65 / 2));
  // A prefix of 1000 blocks adds them to each of the 16 tiles of 512 rows.
  EXPECT_EQ(OneChunk(128000, 512).prefill_tile_blocks, 16 * 1000 + 4 * (4 * 5 / 2));
  // Decode padding reads no key.
  EXPECT_EQ(OneChunk(-1, 1).prefill_tile_blocks, 0);
}

TEST(SelectionPlan, SplitsKeysWhileTheTilesLeaveTheDeviceIdle) {
  const gpu::DeviceInfo device = H200Like();
  // 256 causal tiles do the work of 130 full ones: two chunks each fill
  // the 264 resident CTAs.
  EXPECT_EQ(gpu::PrefillKeySplits(device, OneChunk(0, 8192)), 2);
  // Tiles enough to fill the device: no split.
  EXPECT_EQ(gpu::PrefillKeySplits(device, OneChunk(0, 32768)), 1);
  EXPECT_EQ(gpu::PrefillKeySplits(device, OneChunk(122880, 8192)), 1);
  // A short chunk after a long prefix: 16 tiles, 16 chunks each.
  EXPECT_EQ(gpu::PrefillKeySplits(device, OneChunk(131072, 512)), 16);
  // Never chunks of fewer than 16 blocks.
  EXPECT_EQ(gpu::PrefillKeySplits(device, OneChunk(0, 128)), 1);
}

}  // namespace
}  // namespace blocksel
