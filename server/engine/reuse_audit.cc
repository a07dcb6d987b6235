#include "server/engine/reuse_audit.h"

#include <algorithm>

namespace blocksel {

std::optional<double> BlockOverlap(absl::Span<const int32_t> audited,
                                   absl::Span<const int32_t> source) {
  int32_t valid = 0;
  int32_t shared = 0;
  for (const int32_t id : source) {
    if (id < 0) continue;
    ++valid;
    if (std::find(audited.begin(), audited.end(), id) != audited.end()) ++shared;
  }
  if (valid == 0) return std::nullopt;
  return static_cast<double>(shared) / valid;
}

ReuseAudit::ReuseAudit(const ModelConfig& model)
    : num_heads_(model.num_heads), topk_(model.topk), audit_every_(model.audit_every) {
  for (const int32_t layer : model.audited_layers) {
    const int32_t source = model.SelectionSource(layer);
    source_of_[layer] = source;
    sources_.insert(source);
  }
}

bool ReuseAudit::TakeTurn(int32_t layer) { return batches_[layer]++ % audit_every_ == 0; }

void ReuseAudit::Remember(int32_t layer, uint64_t sequence_id, const LaunchRows& rows) {
  SourceSelection& remembered = remembered_[{sequence_id, layer}];
  remembered.first_position = rows.first_position;
  remembered.num_rows = rows.num_rows;
  remembered.ids.resize(static_cast<size_t>(num_heads_) * rows.num_rows * topk_);
  for (int32_t head = 0; head < num_heads_; ++head) {
    std::copy_n(rows.head_major + (int64_t{head} * rows.total_rows + rows.first_row) * topk_,
                int64_t{rows.num_rows} * topk_,
                remembered.ids.begin() + int64_t{head} * rows.num_rows * topk_);
  }
}

std::optional<std::vector<double>> ReuseAudit::Compare(int32_t layer, uint64_t sequence_id,
                                                       const LaunchRows& rows) const {
  const auto source = source_of_.find(layer);
  if (source == source_of_.end()) return std::nullopt;
  const auto remembered = remembered_.find({sequence_id, source->second});
  if (remembered == remembered_.end() || remembered->second.first_position != rows.first_position ||
      remembered->second.num_rows != rows.num_rows) {
    return std::nullopt;
  }
  std::vector<double> overlaps;
  for (int32_t head = 0; head < num_heads_; ++head) {
    for (int32_t row = 0; row < rows.num_rows; ++row) {
      const int32_t* audited =
          rows.head_major + (int64_t{head} * rows.total_rows + rows.first_row + row) * topk_;
      const int32_t* reused =
          remembered->second.ids.data() + (int64_t{head} * rows.num_rows + row) * topk_;
      const std::optional<double> overlap =
          BlockOverlap(absl::MakeConstSpan(audited, topk_), absl::MakeConstSpan(reused, topk_));
      if (overlap.has_value()) overlaps.push_back(*overlap);
    }
  }
  return overlaps;
}

void ReuseAudit::ForgetClosed(absl::FunctionRef<bool(uint64_t)> is_open) {
  absl::erase_if(remembered_, [&](const auto& entry) { return !is_open(entry.first.first); });
}

void ReuseAudit::Forget(uint64_t sequence_id) {
  for (const int32_t source : sources_) remembered_.erase({sequence_id, source});
}

}  // namespace blocksel
