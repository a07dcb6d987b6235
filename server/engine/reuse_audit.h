// The reuse audit: what a layer that reuses another's selection would have
// selected itself. For an audited layer (ModelConfig::audited_layers) the
// engine stores its keys and, on one in audit_every of its audit batches,
// selects for it and compares the blocks with the ones its source layer
// selected for the same sequence at the same positions.
#ifndef BLOCKSEL_SERVER_ENGINE_REUSE_AUDIT_H_
#define BLOCKSEL_SERVER_ENGINE_REUSE_AUDIT_H_

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/types/span.h"
#include "server/engine/model_config.h"

namespace blocksel {

// The share of the source's block ids (one row of topk, -1 padded) that
// `audited` holds too: shared ids over the source's valid ids, which are
// topk once the row sees topk blocks or more (both layers see the same
// blocks, so the counts agree). nullopt for a row with no valid id (a
// padding row), which has nothing to compare.
std::optional<double> BlockOverlap(absl::Span<const int32_t> audited,
                                   absl::Span<const int32_t> source);

// Rows of one sequence in a launch's head-major [H, total_rows, topk] ids.
struct LaunchRows {
  const int32_t* head_major = nullptr;
  int32_t total_rows = 0;
  int32_t first_row = 0;
  int32_t num_rows = 0;
  int32_t first_position = 0;  // of the first row
};

// Thread-compatible: the engine calls it on its thread.
//
// Memory: the latest decode selection of each source layer of an audited
// layer, per open sequence: sources x sequences x H x Q x topk int32.
class ReuseAudit {
 public:
  explicit ReuseAudit(const ModelConfig& model);

  // Counts one audit batch of audited `layer`; true for the one in
  // audit_every that is selected and compared.
  bool TakeTurn(int32_t layer);

  // Whether some audited layer reuses `layer`'s selections, which are then
  // remembered.
  bool IsSource(int64_t layer) const { return sources_.contains(static_cast<int32_t>(layer)); }

  // Remembers source `layer`'s decode selection of one sequence, replacing
  // the one before.
  void Remember(int32_t layer, uint64_t sequence_id, const LaunchRows& rows);

  // The overlap (BlockOverlap) of each (head, row) of audited `layer`'s
  // selection of one sequence with its source's remembered selection at the
  // same positions, rows without valid ids left out; nullopt when the source
  // has none for those positions (it was not selected for this step, or was
  // selected again since).
  std::optional<std::vector<double>> Compare(int32_t layer, uint64_t sequence_id,
                                             const LaunchRows& rows) const;

  // Drops what is remembered of sequences that are no longer open.
  void ForgetClosed(absl::FunctionRef<bool(uint64_t)> is_open);
  void Forget(uint64_t sequence_id);

 private:
  struct SourceSelection {
    int32_t first_position = 0;
    int32_t num_rows = 0;
    std::vector<int32_t> ids;  // [H, num_rows, topk]
  };

  const int32_t num_heads_;
  const int32_t topk_;
  const int32_t audit_every_;
  absl::flat_hash_map<int32_t, int32_t> source_of_;  // audited layer -> source
  absl::flat_hash_set<int32_t> sources_;
  absl::flat_hash_map<int32_t, int64_t> batches_;  // audit batches seen, per audited layer
  absl::flat_hash_map<std::pair<uint64_t, int32_t>, SourceSelection> remembered_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_REUSE_AUDIT_H_
