// The GPU kernels' limits: one check, with the limit in its message. Needs
// no GPU.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/gpu/gpu_selection.h"
#include "tests/support/random_batch.h"

namespace blocksel {
namespace {

using testing::M3Shape;

TEST(KernelLimits, AcceptsTheM3ShapeAndEveryLimitItself) {
  std::string reason;
  EXPECT_TRUE(gpu::SupportsShape(M3Shape(), &reason)) << reason;
  SelectionShape edge = M3Shape();
  edge.num_heads = gpu::kKernelLimits.max_heads;
  edge.head_dim = gpu::kKernelLimits.max_head_dim;
  edge.topk = gpu::kKernelLimits.max_topk;
  EXPECT_TRUE(gpu::SupportsShape(edge, &reason)) << reason;
  edge.head_dim = gpu::kKernelLimits.min_head_dim;
  EXPECT_TRUE(gpu::SupportsShape(edge, &reason)) << reason;
}

TEST(KernelLimits, NamesTheBrokenLimitAndItsValue) {
  struct Case {
    SelectionShape shape;
    std::string expected;
  };
  std::vector<Case> cases;
  SelectionShape shape = M3Shape();
  shape.topk = 512;
  cases.push_back({shape, "topk 512 is outside [1, 256]"});
  shape = M3Shape();
  shape.head_dim = 512;
  cases.push_back({shape, "head_dim 512 is not a power of two in [16, 256]"});
  shape.head_dim = 48;
  cases.push_back({shape, "head_dim 48 is not a power of two in [16, 256]"});
  shape = M3Shape();
  shape.num_heads = 0;
  cases.push_back({shape, "num_heads 0 is outside [1, 64]"});
  shape = M3Shape();
  shape.local_blocks = -1;
  cases.push_back({shape, "init_blocks and local_blocks must not be negative"});
  for (const Case& c : cases) {
    std::string reason;
    EXPECT_FALSE(gpu::SupportsShape(c.shape, &reason)) << c.expected;
    EXPECT_EQ(reason, c.expected);
    EXPECT_FALSE(gpu::SupportsShape(c.shape, nullptr));
  }
}

TEST(KernelLimits, ChecksThePrefillSharedMemoryOnTheDevice) {
  gpu::DeviceInfo device;
  device.name = "test device";
  device.max_shared_bytes_per_cta = 227 * 1024;
  std::string reason;
  EXPECT_TRUE(gpu::SupportsShapeOn(M3Shape(), device, &reason)) << reason;
  SelectionShape large = M3Shape();
  large.topk = gpu::kKernelLimits.max_topk;
  const int64_t needed = gpu::PrefillSharedBytes(large);
  ASSERT_GT(needed, device.max_shared_bytes_per_cta);
  EXPECT_FALSE(gpu::SupportsShapeOn(large, device, &reason));
  EXPECT_EQ(reason, "topk 256 at head_dim 128 needs " + std::to_string(needed) +
                        " bytes of shared memory per prefill CTA and test device offers 232448; "
                        "lower topk");
  // The device-free limits come first.
  large.num_heads = 0;
  EXPECT_FALSE(gpu::SupportsShapeOn(large, device, &reason));
  EXPECT_EQ(reason, "num_heads 0 is outside [1, 64]");
}

}  // namespace
}  // namespace blocksel
