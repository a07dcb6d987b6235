#include "server/engine/model_config.h"

#include <algorithm>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace blocksel {

SelectionShape ModelConfig::shape() const {
  SelectionShape shape;
  shape.num_heads = num_heads;
  shape.head_dim = head_dim;
  shape.key_dtype = key_dtype;
  shape.topk = topk;
  shape.init_blocks = init_blocks;
  shape.local_blocks = local_blocks;
  return shape;
}

int32_t ModelConfig::num_selecting_layers() const {
  return selecting_layers.empty() ? num_sparse_layers()
                                  : static_cast<int32_t>(selecting_layers.size());
}

bool ModelConfig::IsSelecting(int64_t layer) const {
  if (selecting_layers.empty()) return IsSparseLayer(layer);
  return std::binary_search(selecting_layers.begin(), selecting_layers.end(), layer);
}

bool ModelConfig::IsAudited(int64_t layer) const {
  return std::binary_search(audited_layers.begin(), audited_layers.end(), layer);
}

int32_t ModelConfig::SelectionSource(int64_t layer) const {
  if (selecting_layers.empty()) return static_cast<int32_t>(layer);
  // The last selecting layer at or before `layer`.
  const auto after = std::upper_bound(selecting_layers.begin(), selecting_layers.end(), layer);
  return after == selecting_layers.begin() ? -1 : *(after - 1);
}

int32_t ModelConfig::KeyLayerIndex(int64_t layer) const {
  if (!IsSparseLayer(layer)) return -1;
  if (selecting_layers.empty()) return static_cast<int32_t>(layer - first_sparse_layer);
  if (!IsSelecting(layer) && !IsAudited(layer)) return -1;
  // The key layers before `layer`: no allocation, since selections call it.
  const auto selecting_before =
      std::lower_bound(selecting_layers.begin(), selecting_layers.end(), layer) -
      selecting_layers.begin();
  const auto audited_before =
      std::lower_bound(audited_layers.begin(), audited_layers.end(), layer) -
      audited_layers.begin();
  return static_cast<int32_t>(selecting_before + audited_before);
}

std::vector<int32_t> ModelConfig::KeyLayerList() const {
  std::vector<int32_t> layers = SelectingLayerList();
  layers.insert(layers.end(), audited_layers.begin(), audited_layers.end());
  std::sort(layers.begin(), layers.end());
  return layers;
}

std::vector<int32_t> ModelConfig::SelectingLayerList() const {
  return selecting_layers.empty() ? EveryKthLayer(first_sparse_layer, num_layers, 1)
                                  : selecting_layers;
}

absl::Status ModelConfig::Validate() const {
  std::vector<std::string> problems;
  if (num_layers < 1) {
    problems.push_back(absl::StrCat("num_layers must be >= 1, got ", num_layers));
  }
  if (first_sparse_layer < 0 || first_sparse_layer >= num_layers) {
    problems.push_back(absl::StrCat("first_sparse_layer must be in [0, num_layers=", num_layers,
                                    "), got ", first_sparse_layer));
  }
  if (num_heads < 1 || num_heads > kMaxHeads) {
    problems.push_back(absl::StrCat("num_heads must be in [1, ", kMaxHeads, "], got ", num_heads));
  }
  if (head_dim < 16 || head_dim > kMaxHeadDim || head_dim % 16 != 0) {
    problems.push_back(absl::StrCat("head_dim must be a multiple of 16 in [16, ", kMaxHeadDim,
                                    "], got ", head_dim));
  }
  if (topk < 1 || topk > 4096) {
    problems.push_back(absl::StrCat("topk must be in [1, 4096], got ", topk));
  }
  if (init_blocks < 0) {
    problems.push_back(absl::StrCat("init_blocks must be >= 0, got ", init_blocks));
  }
  if (local_blocks < 0) {
    problems.push_back(absl::StrCat("local_blocks must be >= 0, got ", local_blocks));
  }
  if (max_positions < 1 || max_positions > (int64_t{1} << 31) - kBlockSize) {
    problems.push_back(
        absl::StrCat("max_positions must be in [1, 2^31 - 128], got ", max_positions));
  }
  if (!selecting_layers.empty()) {
    if (selecting_layers.front() != first_sparse_layer) {
      problems.push_back(
          absl::StrCat("selecting layers must start at first_sparse_layer=", first_sparse_layer,
                       " (it has no earlier selection to reuse), got ", selecting_layers.front()));
    }
    for (size_t i = 0; i < selecting_layers.size(); ++i) {
      if (!IsSparseLayer(selecting_layers[i]) ||
          (i > 0 && selecting_layers[i] <= selecting_layers[i - 1])) {
        problems.push_back(absl::StrCat("selecting layers must be ascending sparse layers in [",
                                        first_sparse_layer, ", ", num_layers, "), got ",
                                        absl::StrJoin(selecting_layers, ",")));
        break;
      }
    }
  }
  for (size_t i = 0; i < audited_layers.size(); ++i) {
    const int32_t layer = audited_layers[i];
    if (!IsSparseLayer(layer) || (i > 0 && layer <= audited_layers[i - 1])) {
      problems.push_back(absl::StrCat("audited layers must be ascending sparse layers in [",
                                      first_sparse_layer, ", ", num_layers, "), got ",
                                      absl::StrJoin(audited_layers, ",")));
      break;
    }
    if (selecting_layers.empty()) {
      problems.push_back(absl::StrCat(
          "audited layer ", layer,
          " selects, as every sparse layer does without selecting layers: set "
          "--select_every or --selecting_layers so that some layers reuse a selection"));
      break;
    }
    if (IsSelecting(layer)) {
      problems.push_back(absl::StrCat(
          "audited layer ", layer, " is a selecting layer (selecting layers are ",
          absl::StrJoin(selecting_layers, ","), "); audit only layers that reuse a selection"));
    }
  }
  if (audit_every < 1) {
    problems.push_back(absl::StrCat("audit_every must be >= 1, got ", audit_every));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("invalid model config: ", absl::StrJoin(problems, "; ")));
}

std::string ModelConfig::ToString() const {
  return absl::StrCat(
      "layers=", num_layers, " sparse=[", first_sparse_layer, ",", num_layers,
      ") heads=", num_heads, " head_dim=", head_dim, " key_dtype=", KeyDtypeName(key_dtype),
      " topk=", topk, " init_blocks=", init_blocks, " local_blocks=", local_blocks,
      " max_positions=", max_positions,
      " selecting_layers=", selecting_layers.empty() ? "all" : absl::StrJoin(selecting_layers, ","),
      audited_layers.empty() ? ""
                             : absl::StrCat(" audited_layers=", absl::StrJoin(audited_layers, ","),
                                            " audit_every=", audit_every));
}

std::vector<int32_t> EveryKthLayer(int32_t first_sparse_layer, int32_t num_layers, int32_t every) {
  std::vector<int32_t> layers;
  for (int32_t layer = first_sparse_layer; layer < num_layers; layer += every) {
    layers.push_back(layer);
  }
  return layers;
}

absl::StatusOr<std::vector<int32_t>> ParseLayerList(absl::string_view text) {
  std::vector<int32_t> layers;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t layer = 0;
    if (!absl::SimpleAtoi(item, &layer)) {
      return absl::InvalidArgumentError(absl::StrCat("layer list '", text, "': '", item,
                                                     "' is not a layer number; write e.g. 3,7,11"));
    }
    layers.push_back(layer);
  }
  return layers;
}

absl::StatusOr<KeyDtype> ParseKeyDtype(absl::string_view name) {
  if (name == "bf16") return KeyDtype::kBf16;
  if (name == "fp8_e4m3" || name == "fp8") return KeyDtype::kFp8E4m3;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown key dtype '", name, "': use bf16 or fp8_e4m3"));
}

absl::string_view KeyDtypeName(KeyDtype dtype) {
  return dtype == KeyDtype::kBf16 ? "bf16" : "fp8_e4m3";
}

}  // namespace blocksel
