#include "tests/support/gpu_runner.h"

#include <algorithm>
#include <vector>

#include "gtest/gtest.h"

namespace blocksel::testing {

DeviceBuffer::DeviceBuffer(int64_t bytes) {
  EXPECT_EQ(gpu::DeviceAlloc(&data_, std::max<int64_t>(bytes, 16)), KernelStatus::kOk);
}

DeviceBuffer::~DeviceBuffer() { gpu::DeviceFree(data_); }

bool GpuRunner::HaveDevice() { return gpu::DeviceCount() > 0; }

bool GpuRunner::Supports(const SelectionProblem& problem, GpuPath path) {
  if (path != GpuPath::kDecode && path != GpuPath::kDecodeEntryPoint) return true;
  // Whether the plan takes it pinned to decode: the kernel library's own
  // limits, not a copy of them.
  gpu::BatchDims dims;
  for (const RowSpan& span : problem.spans) {
    gpu::AddSpan(problem.shape, span.first_position, span.num_rows, &dims);
  }
  const gpu::DeviceInfo any_device;  // whether decode fits does not depend on it
  gpu::PlanOptions decode;
  decode.force_path = true;
  decode.path = gpu::KernelPath::kDecode;
  gpu::SelectionPlan plan;
  return gpu::Plan(problem.shape, dims, any_device, decode, &plan) == KernelStatus::kOk;
}

GpuRunner::GpuRunner() {
  EXPECT_EQ(gpu::QueryDevice(0, &device_), KernelStatus::kOk);
  EXPECT_EQ(gpu::StreamCreate(&stream_), KernelStatus::kOk);
}

GpuRunner::~GpuRunner() { gpu::StreamDestroy(stream_); }

std::vector<int32_t> GpuRunner::Run(const SelectionProblem& problem, GpuPath path,
                                    std::vector<float>* scores_out, int32_t* max_blocks_out) {
  std::vector<gpu::DeviceSpan> spans;
  std::vector<int32_t> table;
  gpu::BatchDims dims;
  for (size_t i = 0; i < problem.spans.size(); ++i) {
    const RowSpan& span = problem.spans[i];
    gpu::AddSpan(problem.shape, span.first_position, span.num_rows, &dims);
    spans.push_back(
        {span.first_position, span.num_rows, span.first_row, static_cast<int32_t>(table.size())});
    table.insert(table.end(), problem.block_tables[i].begin(), problem.block_tables[i].end());
  }
  const SelectionShape& shape = problem.shape;
  const int32_t max_rows = dims.max_rows_per_span;
  const int64_t out_count = int64_t{shape.num_heads} * problem.total_rows * shape.topk;
  // The kernel paths run through the plan, pinned to the path under test.
  gpu::PlanOptions options;
  options.force_path = true;
  const bool decode = path == GpuPath::kDecode || path == GpuPath::kDecodeEntryPoint;
  options.path = decode ? gpu::KernelPath::kDecode : gpu::KernelPath::kPrefill;
  options.splits = path == GpuPath::kPrefill           ? 1
                   : path == GpuPath::kPrefillKeySplit ? kTestKeySplits
                                                       : 0;
  gpu::SelectionPlan plan;
  if (path != GpuPath::kScoresThenTopK) {
    EXPECT_EQ(gpu::Plan(shape, dims, device_, options, &plan), KernelStatus::kOk);
  }
  DeviceBuffer pool(static_cast<int64_t>(problem.pool.size()));
  DeviceBuffer table_device(static_cast<int64_t>(table.size()) * 4);
  DeviceBuffer spans_device(static_cast<int64_t>(spans.size() * sizeof(gpu::DeviceSpan)));
  DeviceBuffer queries(static_cast<int64_t>(problem.queries.size()) * 2);
  DeviceBuffer out(out_count * 4);
  const int64_t workspace_bytes = plan.workspace_bytes;
  DeviceBuffer fresh_workspace(reused_workspace_ == nullptr ? workspace_bytes : 0);
  if (reused_workspace_ == nullptr) {
    EXPECT_EQ(gpu::ZeroDevice(fresh_workspace.get(), workspace_bytes, stream_), KernelStatus::kOk);
  }
  EXPECT_EQ(gpu::CopyHostToDevice(pool.get(), problem.pool.data(),
                                  static_cast<int64_t>(problem.pool.size()), stream_),
            KernelStatus::kOk);
  EXPECT_EQ(gpu::CopyHostToDevice(table_device.get(), table.data(),
                                  static_cast<int64_t>(table.size()) * 4, stream_),
            KernelStatus::kOk);
  EXPECT_EQ(
      gpu::CopyHostToDevice(spans_device.get(), spans.data(),
                            static_cast<int64_t>(spans.size() * sizeof(gpu::DeviceSpan)), stream_),
      KernelStatus::kOk);
  EXPECT_EQ(gpu::CopyHostToDevice(queries.get(), problem.queries.data(),
                                  static_cast<int64_t>(problem.queries.size()) * 2, stream_),
            KernelStatus::kOk);
  // Poison: every slot must be written.
  std::vector<int32_t> result(out_count, -7);
  EXPECT_EQ(gpu::CopyHostToDevice(out.get(), result.data(), out_count * 4, stream_),
            KernelStatus::kOk);
  gpu::DeviceBatch batch;
  batch.key_pool = pool.get();
  batch.num_pages = problem.num_pages;
  batch.block_table = static_cast<const int32_t*>(table_device.get());
  batch.spans = static_cast<const gpu::DeviceSpan*>(spans_device.get());
  batch.num_spans = static_cast<int32_t>(spans.size());
  batch.queries = static_cast<const uint16_t*>(queries.get());
  batch.total_rows = problem.total_rows;
  batch.block_ids = static_cast<int32_t*>(out.get());
  batch.workspace = reused_workspace_ != nullptr ? reused_workspace_ : fresh_workspace.get();
  batch.workspace_bytes = reused_workspace_ != nullptr ? reused_workspace_bytes_ : workspace_bytes;
  // Score path: positions of every row, the visible blocks of the longest.
  std::vector<int32_t> positions(problem.total_rows);
  int32_t max_blocks = 1;
  for (const RowSpan& span : problem.spans) {
    for (int32_t r = 0; r < span.num_rows; ++r) {
      positions[span.first_row + r] = span.first_position + r;
      max_blocks = std::max(max_blocks, VisibleBlocks(span.first_position + r));
    }
  }
  const int64_t score_count = out_count / shape.topk * max_blocks;
  DeviceBuffer scores(path == GpuPath::kScoresThenTopK ? score_count * 4 : 16);
  DeviceBuffer positions_device(static_cast<int64_t>(positions.size()) * 4);
  EXPECT_EQ(gpu::CopyHostToDevice(positions_device.get(), positions.data(),
                                  static_cast<int64_t>(positions.size()) * 4, stream_),
            KernelStatus::kOk);
  KernelStatus launched = KernelStatus::kOk;
  switch (path) {
    case GpuPath::kDecode:
    case GpuPath::kPrefill:
    case GpuPath::kPrefillKeySplit:
      launched = gpu::Select(plan, batch, stream_);
      break;
    case GpuPath::kDecodeEntryPoint:
      launched = gpu::LaunchDecode(shape, batch, max_rows, gpu::DecodeSplits(device_), stream_);
      break;
    case GpuPath::kScoresThenTopK:
      launched = gpu::LaunchBlockScores(shape, batch, max_rows, static_cast<float*>(scores.get()),
                                        max_blocks, stream_);
      if (launched == KernelStatus::kOk) {
        launched = gpu::LaunchTopKFromScores(
            shape, static_cast<const float*>(scores.get()), max_blocks,
            static_cast<const int32_t*>(positions_device.get()), problem.total_rows,
            static_cast<int32_t*>(out.get()), stream_);
      }
      break;
  }
  EXPECT_EQ(launched, KernelStatus::kOk) << gpu::LastErrorText();
  if (scores_out != nullptr && path == GpuPath::kScoresThenTopK) {
    scores_out->resize(score_count);
    EXPECT_EQ(gpu::CopyDeviceToHost(scores_out->data(), scores.get(), score_count * 4, stream_),
              KernelStatus::kOk);
    *max_blocks_out = max_blocks;
  }
  EXPECT_EQ(gpu::CopyDeviceToHost(result.data(), out.get(), out_count * 4, stream_),
            KernelStatus::kOk);
  EXPECT_EQ(gpu::StreamSynchronize(stream_), KernelStatus::kOk) << gpu::LastErrorText();
  return result;
}

}  // namespace blocksel::testing
