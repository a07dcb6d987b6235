// GPU selection kernels and the device runtime calls a backend needs, behind
// a plain C++ interface: no CUDA/HIP type crosses it, streams are void*, and
// every call returns a KernelStatus (FlashInfer's style). Host code includes
// this header only; the .cu files include no RPC or logging headers.
#ifndef BLOCKSEL_KERNELS_GPU_GPU_SELECTION_H_
#define BLOCKSEL_KERNELS_GPU_GPU_SELECTION_H_

#include <cstdint>
#include <string>

#include "kernels/selection_types.h"

namespace blocksel::gpu {

// ---------------------------------------------------------------- runtime

struct DeviceInfo {
  std::string name;
  int multiprocessors = 0;
  int compute_major = 0;
  int compute_minor = 0;
  int64_t total_memory = 0;
  int warp_size = 0;
  int64_t max_shared_bytes_per_cta = 0;  // with the opt-in above the default
};

// Number of usable devices (0 when there is no driver or no device).
int DeviceCount();
KernelStatus QueryDevice(int device, DeviceInfo* info);
KernelStatus SetDevice(int device);
// The device's PCI bus id ("0000:1b:00.0"), which names the same GPU in
// every process whatever its visible-device numbering.
KernelStatus PciBusId(int device, std::string* bus_id);
// The device this process sees under a PCI bus id; kDeviceError when it
// sees none (another host's GPU, or one hidden by CUDA_VISIBLE_DEVICES).
KernelStatus DeviceByPciBusId(const std::string& bus_id, int* device);
// *can: whether kernels on `device` can reach memory of `peer` (NVLink or
// PCIe peer to peer). A device always reaches its own memory.
KernelStatus CanAccessPeer(int device, int peer, bool* can);
// The runtime's text for the last error seen by this thread's calls.
const char* LastErrorText();

KernelStatus DeviceAlloc(void** pointer, int64_t bytes);
void DeviceFree(void* pointer);
// Pinned host memory, which kernels may also read and write (zero-copy).
KernelStatus PinnedAlloc(void** pointer, int64_t bytes);
void PinnedFree(void* pointer);
// The address under which kernels reach pinned host memory.
KernelStatus DevicePointerOf(void* pinned, void** device);
KernelStatus StreamCreate(void** stream);
void StreamDestroy(void* stream);
KernelStatus StreamSynchronize(void* stream);
KernelStatus CopyHostToDevice(void* device, const void* host, int64_t bytes, void* stream);
KernelStatus CopyDeviceToHost(void* host, const void* device, int64_t bytes, void* stream);
// Makes the stream wait, without occupying the GPU, until the 32-bit word
// at device address `word` (device memory, or registered host memory as
// kernels reach it) equals value. Capturable into a graph.
KernelStatus StreamWaitWord(void* stream, const uint32_t* word, uint32_t value);
// Host memory allocated elsewhere (shared memory, say) made reachable by
// kernels: *device is the address they use.
KernelStatus HostRegister(void* host, int64_t bytes, void** device);
void HostUnregister(void* host);
// Interprocess sharing of a DeviceAlloc'ed buffer: the opaque handle
// another process on the same host opens to map it.
inline constexpr int kIpcHandleBytes = 64;
KernelStatus IpcExport(void* device, std::string* handle);
KernelStatus IpcOpen(const std::string& handle, void** device);
void IpcClose(void* device);
// Sets bytes of device memory to zero, in stream order.
KernelStatus ZeroDevice(void* device, int64_t bytes, void* stream);

// Events mark points in a stream; created with timing, so two that have
// completed give the device time between them.
KernelStatus EventCreate(void** event);
void EventDestroy(void* event);
KernelStatus EventRecord(void* event, void* stream);
// *done: whether the work before the event has completed. Never blocks.
KernelStatus EventQuery(void* event, bool* done);
// Waits until the work before the event has completed.
KernelStatus EventSynchronize(void* event);
// Device time from start to end, both completed.
KernelStatus EventElapsedSeconds(void* start, void* end, double* seconds);

// A captured sequence of launches on one stream, replayed as one graph.
class CapturedGraph {
 public:
  CapturedGraph() = default;
  ~CapturedGraph();
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;

  KernelStatus BeginCapture(void* stream);
  KernelStatus EndCapture(void* stream);  // instantiates the graph
  KernelStatus Replay(void* stream);
  bool ready() const { return exec_ != nullptr; }

 private:
  void* graph_ = nullptr;
  void* exec_ = nullptr;
};

// ---------------------------------------------------------------- kernels

// One run of bytes to move within device memory, from an upload buffer to
// where it belongs. Addresses and bytes are multiples of 4 (16 runs
// fastest).
struct CopyRun {
  uint64_t destination;
  uint64_t source;
  uint32_t bytes;
  uint32_t reserved;
};

// Copies runs[0, *num_runs) in one launch; runs and num_runs are device
// memory read by the kernel, so a captured launch serves any count. The
// runs must not overlap one another's destinations.
KernelStatus LaunchCopyRuns(const CopyRun* runs, const int32_t* num_runs, void* stream);

// Rows [first_row, first_row + num_rows) of a batch belong to one sequence;
// row i sits at first_position + i (negative: padding, all -1). Its logical
// block b lives in page block_table[table_offset + b].
struct DeviceSpan {
  int32_t first_position;
  int32_t num_rows;
  int32_t first_row;
  int32_t table_offset;
};

// One selection over one layer. Every pointer is device memory.
struct DeviceBatch {
  const void* key_pool = nullptr;  // [num_pages][kBlockSize][head_dim]
  // Decode only, optional: device memory holding the key pool pointer,
  // read by the kernel instead of key_pool. A captured graph then serves
  // every layer: the caller rewrites the pointer, not the graph.
  const void* const* key_pool_ref = nullptr;
  int64_t num_pages = 0;
  const int32_t* block_table = nullptr;  // flat; spans index it
  const DeviceSpan* spans = nullptr;
  int32_t num_spans = 0;
  const uint16_t* queries = nullptr;  // bf16 [total_rows][H][D]
  int32_t total_rows = 0;
  int32_t* block_ids = nullptr;  // int32 [H][total_rows][topk]
  void* workspace = nullptr;     // Decode/PrefillWorkspaceBytes(...) bytes
  int64_t workspace_bytes = 0;
};

// What the GPU kernels run, in one place. A backend checks its model
// against it when it is created (SupportsShape), so no selection ever meets
// a shape the kernels cannot run.
struct KernelLimits {
  int32_t max_heads = kMaxHeads;
  int32_t min_head_dim = 16;  // head dims: powers of two in [min, max]
  int32_t max_head_dim = 256;
  // Every path, where the device's shared memory holds the prefill lists
  // (SupportsShapeOn).
  int32_t max_topk = 256;
  // The decode kernel (and so decode graphs): larger topk, or more rows per
  // span x heads, decode through the prefill kernel.
  int32_t max_decode_topk = 64;
  int32_t max_decode_queries = 64;
};
inline constexpr KernelLimits kKernelLimits{};

// Whether the kernels run models of this shape; if not, *reason says which
// limit it breaks, with the limit's value.
bool SupportsShape(const SelectionShape& shape, std::string* reason);
// SupportsShape, and what the shape needs of this device (the prefill
// kernel's shared memory, which grows with topk and head_dim).
bool SupportsShapeOn(const SelectionShape& shape, const DeviceInfo& device, std::string* reason);

// Decode: every span has at most max_rows_per_span rows,
// max_rows_per_span * H <= max_decode_queries and topk <= max_decode_topk.
// One launch. The scored key blocks of the whole batch (those some row
// leaves unforced: DecodeScoredBlocks of each span's last row) are split
// evenly over `splits` CTAs on the device (the split does not depend on
// sequence lengths, so the launch can be captured in a graph and replayed
// for any lengths); their block maxima go to the workspace, and the CTA
// that completes a span selects its rows.
//
// The workspace must be zero before its first decode launch (ZeroDevice)
// and serve decode launches only: each launch leaves it zero again (its
// completion counters reset themselves). It holds a batch of up to
// max_spans spans whose DecodeScoredBlocks sum to at most
// max_scored_blocks; a batch it cannot hold gets -1 in every row, and no
// memory beyond the workspace is touched.
BLOCKSEL_HOST_DEVICE constexpr int32_t DecodeScoredBlocks(const SelectionShape& shape,
                                                          int64_t last_position) {
  return last_position < 0 || VisibleBlocks(last_position) - shape.local_blocks <= shape.init_blocks
             ? 0
             : VisibleBlocks(last_position) - shape.local_blocks - shape.init_blocks;
}
int64_t DecodeWorkspaceBytes(const SelectionShape& shape, int32_t max_spans,
                             int32_t max_rows_per_span, int64_t max_scored_blocks);
// A good split count for the device (a few CTAs per multiprocessor).
int32_t DecodeSplits(const DeviceInfo& device);
KernelStatus LaunchDecode(const SelectionShape& shape, const DeviceBatch& batch,
                          int32_t max_rows_per_span, int32_t splits, void* stream);

// Prefill: any spans, none longer than max_rows_per_span rows. A tile of
// 128 (row, head) pairs of one span, its rows' H heads together, shares
// each key page read; matrix units score the tile (on sm_90a warpgroup
// instructions); a running top-k per (row, head) stays on chip, so no score
// tensor is ever written. Tiles start longest first. With key_splits = 1:
// one launch, no workspace. With more, the blocks of the longest row
// (max_visible_blocks) are cut into key_splits chunks of equal size, and
// each tile takes one CTA per chunk it sees (a causal span's early tiles
// take few). A second kernel merges a tile's partial lists
// (PrefillWorkspaceBytes) exactly.
struct BatchDims;  // below, with the plan
inline constexpr int32_t kMaxPrefillKeySplits = 32;
inline constexpr int32_t kPrefillTileQueries = 128;  // (row, head) pairs of a CTA's tile

BLOCKSEL_HOST_DEVICE constexpr int64_t TilesPerSpan(int32_t num_rows, int32_t heads) {
  return (int64_t{num_rows} * heads + kPrefillTileQueries - 1) / kPrefillTileQueries;
}

// Blocks seen by tile `tile` of a span of num_rows rows from
// first_position, with H = heads: those of its last row.
BLOCKSEL_HOST_DEVICE constexpr int32_t TileBlocks(int64_t first_position, int32_t num_rows,
                                                  int32_t heads, int32_t tile) {
  const int64_t queries = int64_t{num_rows} * heads;
  const int64_t end = (int64_t{tile} + 1) * kPrefillTileQueries;
  return VisibleBlocks(first_position + ((end < queries ? end : queries) - 1) / heads);
}

// Shared memory one prefill CTA needs for the shape; a device that offers a
// CTA less (DeviceInfo::max_shared_bytes_per_cta) cannot run it.
int64_t PrefillSharedBytes(const SelectionShape& shape);

// A key split that fills the device's resident CTA slots when the tiles,
// counted by their work (BatchDims::prefill_tile_blocks), leave some
// empty; 1 when they do not.
int32_t PrefillKeySplits(const DeviceInfo& device, const BatchDims& dims);
int64_t PrefillWorkspaceBytes(const SelectionShape& shape, int32_t total_rows, int32_t key_splits);
// max_visible_blocks: blocks the longest row sees (it sizes the chunks; a
// batch with longer rows still runs, in larger chunks).
KernelStatus LaunchPrefill(const SelectionShape& shape, const DeviceBatch& batch,
                           int32_t max_rows_per_span, int32_t max_visible_blocks,
                           int32_t key_splits, void* stream);

// ------------------------------------------------------- plan, then select
// The one way the server, the GPU tests and the benchmark run a selection:
// a plan made on the host for the dimensions of a batch (or for the
// largest batch a captured graph serves) picks the kernel, its split and
// its workspace; Select runs it on any batch within those dimensions,
// without a host synchronization or an allocation, so it can be captured.

// The host-side dimensions of a batch.
struct BatchDims {
  int32_t num_spans = 0;
  int32_t total_rows = 0;
  int32_t max_rows_per_span = 0;
  int32_t max_visible_blocks = 0;   // blocks the longest row sees
  int64_t scored_blocks = 0;        // DecodeScoredBlocks summed over the spans
  int64_t prefill_tile_blocks = 0;  // TileBlocks summed over every prefill tile
};

// Adds a span of num_rows rows from first_position (negative: padding).
void AddSpan(const SelectionShape& shape, int64_t first_position, int32_t num_rows,
             BatchDims* dims);

enum class KernelPath : int32_t { kDecode = 0, kPrefill = 1 };

struct PlanOptions {
  bool force_path = false;  // tests pin a kernel; otherwise decode when the batch fits it
  KernelPath path = KernelPath::kDecode;
  int32_t splits = 0;  // > 0: this split (decode CTAs, prefill key splits) instead of the device's
};

struct SelectionPlan {
  SelectionShape shape;
  BatchDims dims;
  KernelPath path = KernelPath::kPrefill;
  int32_t splits = 1;           // decode CTAs, or prefill key splits
  int64_t workspace_bytes = 0;  // what DeviceBatch::workspace must hold
  // Decode: the workspace must be zero before its first use (ZeroDevice);
  // every launch leaves it so.
  bool zero_workspace_once = false;
};

// kUnsupported when the shape or the dimensions are beyond the kernels
// (or a forced path cannot run them).
KernelStatus Plan(const SelectionShape& shape, const BatchDims& dims, const DeviceInfo& device,
                  const PlanOptions& options, SelectionPlan* plan);

// Runs the plan on `batch`, whose dimensions are within the plan's.
KernelStatus Select(const SelectionPlan& plan, const DeviceBatch& batch, void* stream);

// ------------------------------------------------ vLLM's indexer entry points
// For callers that link the kernels in process and want vLLM's three calls:
// score, top-k from scores, and decode (LaunchDecode above, which writes
// into the caller's block_ids buffer, a stable address for graph capture).

// Score: scores[h][row][b] (fp32, device, [H][total_rows][max_blocks]) is the
// block score of SEMANTICS.md (max of q.k over the keys of block b the row
// sees, NaN token scores as -1e30) and -inf for blocks the row cannot see.
// max_blocks must cover the visible blocks of every row.
KernelStatus LaunchBlockScores(const SelectionShape& shape, const DeviceBatch& batch,
                               int32_t max_rows_per_span, float* scores, int32_t max_blocks,
                               void* stream);

// Top-k from scores of that layout: positions[row] is the row's absolute
// position (negative: padding, all -1). Applies the init/local forcing and
// writes block_ids [H][rows][topk] in SEMANTICS.md's order.
KernelStatus LaunchTopKFromScores(const SelectionShape& shape, const float* scores,
                                  int32_t max_blocks, const int32_t* positions, int32_t rows,
                                  int32_t* block_ids, void* stream);

}  // namespace blocksel::gpu

#endif  // BLOCKSEL_KERNELS_GPU_GPU_SELECTION_H_
