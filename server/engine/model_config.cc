#include "server/engine/model_config.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

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
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("invalid model config: ", absl::StrJoin(problems, "; ")));
}

std::string ModelConfig::ToString() const {
  return absl::StrCat("layers=", num_layers, " sparse=[", first_sparse_layer, ",", num_layers,
                      ") heads=", num_heads, " head_dim=", head_dim,
                      " key_dtype=", KeyDtypeName(key_dtype), " topk=", topk,
                      " init_blocks=", init_blocks, " local_blocks=", local_blocks,
                      " max_positions=", max_positions);
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
