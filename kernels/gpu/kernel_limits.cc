// SupportsShape: the one check of a model shape against kKernelLimits.
#include <string>

#include "kernels/gpu/gpu_selection.h"

namespace blocksel::gpu {

bool SupportsShape(const SelectionShape& shape, std::string* reason) {
  const KernelLimits& limits = kKernelLimits;
  auto fail = [reason](std::string text) {
    if (reason != nullptr) *reason = std::move(text);
    return false;
  };
  if (shape.num_heads < 1 || shape.num_heads > limits.max_heads) {
    return fail("num_heads " + std::to_string(shape.num_heads) + " is outside [1, " +
                std::to_string(limits.max_heads) + "]");
  }
  const int32_t dim = shape.head_dim;
  if (dim < limits.min_head_dim || dim > limits.max_head_dim || (dim & (dim - 1)) != 0) {
    return fail("head_dim " + std::to_string(dim) + " is not a power of two in [" +
                std::to_string(limits.min_head_dim) + ", " + std::to_string(limits.max_head_dim) +
                "]");
  }
  if (shape.topk < 1 || shape.topk > limits.max_topk) {
    return fail("topk " + std::to_string(shape.topk) + " is outside [1, " +
                std::to_string(limits.max_topk) + "]");
  }
  if (shape.init_blocks < 0 || shape.local_blocks < 0) {
    return fail("init_blocks and local_blocks must not be negative");
  }
  return true;
}

bool SupportsShapeOn(const SelectionShape& shape, const DeviceInfo& device, std::string* reason) {
  if (!SupportsShape(shape, reason)) return false;
  const int64_t needed = PrefillSharedBytes(shape);
  if (needed > device.max_shared_bytes_per_cta) {
    if (reason != nullptr) {
      *reason = "topk " + std::to_string(shape.topk) + " at head_dim " +
                std::to_string(shape.head_dim) + " needs " + std::to_string(needed) +
                " bytes of shared memory per prefill CTA and " + device.name + " offers " +
                std::to_string(device.max_shared_bytes_per_cta) + "; lower topk";
    }
    return false;
  }
  return true;
}

}  // namespace blocksel::gpu
