// The model a server selects blocks for, fixed at start.
#ifndef BLOCKSEL_SERVER_ENGINE_MODEL_CONFIG_H_
#define BLOCKSEL_SERVER_ENGINE_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/selection_types.h"

namespace blocksel {

// Defaults are MiniMax M3's lightning indexer at tensor-parallel 1.
struct ModelConfig {
  int32_t num_layers = 60;
  int32_t first_sparse_layer = 3;  // layers [first_sparse_layer, num_layers)
  int32_t num_heads = 4;
  int32_t head_dim = 128;
  KeyDtype key_dtype = KeyDtype::kBf16;
  int32_t topk = 16;
  int32_t init_blocks = 0;
  int32_t local_blocks = 1;
  int64_t max_positions = int64_t{1} << 20;
  // The sparse layers that select, ascending from first_sparse_layer; every
  // other sparse layer reuses the selection of the nearest one before it
  // and stores no index keys. Empty: every sparse layer selects.
  std::vector<int32_t> selecting_layers;
  // Reusing sparse layers that are audited (ascending): their index keys are
  // stored too, and for one in audit_every of their decode batches sent as
  // audits the server also selects for them and compares that selection
  // with their source's. Empty: no audit.
  std::vector<int32_t> audited_layers;
  int32_t audit_every = 1;

  int32_t num_sparse_layers() const { return num_layers - first_sparse_layer; }
  bool IsSparseLayer(int64_t layer) const {
    return layer >= first_sparse_layer && layer < num_layers;
  }
  int32_t num_selecting_layers() const;
  // Layers that store index keys: the selecting and the audited ones.
  int32_t num_key_layers() const {
    return num_selecting_layers() + static_cast<int32_t>(audited_layers.size());
  }
  bool IsSelecting(int64_t layer) const;
  bool IsAudited(int64_t layer) const;
  // The selecting layer whose selection sparse layer `layer` uses: itself
  // when it selects.
  int32_t SelectionSource(int64_t layer) const;
  // Where a layer's keys are stored, in [0, num_key_layers()), in the order
  // of the layers; -1 for a layer that stores none.
  int32_t KeyLayerIndex(int64_t layer) const;
  // Every layer that stores keys, ascending: KeyLayerList()[KeyLayerIndex(l)] == l.
  std::vector<int32_t> KeyLayerList() const;
  // Every selecting layer (all sparse layers when selecting_layers is empty).
  std::vector<int32_t> SelectingLayerList() const;
  // Bytes of one token's key in one layer.
  int64_t TokenBytes() const { return static_cast<int64_t>(head_dim) * KeyDtypeBytes(key_dtype); }
  // Bytes of one page (kBlockSize tokens) of one layer.
  int64_t LayerPageBytes() const { return TokenBytes() * kBlockSize; }
  // Bytes of one page over all layers that store keys: the unit of cache
  // capacity.
  int64_t PageBytes() const { return LayerPageBytes() * num_key_layers(); }

  SelectionShape shape() const;

  // OK, or INVALID_ARGUMENT naming every value out of range.
  absl::Status Validate() const;

  std::string ToString() const;
};

// The selecting layers of a model whose sparse layers from
// first_sparse_layer select every `every`-th (every >= 1).
std::vector<int32_t> EveryKthLayer(int32_t first_sparse_layer, int32_t num_layers, int32_t every);
// A comma-separated list of layer numbers ("3,7,11").
absl::StatusOr<std::vector<int32_t>> ParseLayerList(absl::string_view text);

// "bf16" or "fp8_e4m3" (also "fp8").
absl::StatusOr<KeyDtype> ParseKeyDtype(absl::string_view name);
absl::string_view KeyDtypeName(KeyDtype dtype);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_MODEL_CONFIG_H_
