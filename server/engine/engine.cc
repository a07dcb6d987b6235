#include "server/engine/engine.h"

#include <algorithm>
#include <bit>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/engine/select_plan.h"

namespace blocksel {

// Largest block-score tensor a response may carry.
constexpr int64_t kMaxBlockScoreBytes = int64_t{64} << 20;

// Packed payloads are little-endian; the engine copies them as they are.
static_assert(std::endian::native == std::endian::little, "blocksel assumes a little-endian host");

v1::ModelConfig ToProto(const ModelConfig& model) {
  v1::ModelConfig proto;
  proto.set_num_layers(model.num_layers);
  proto.set_first_sparse_layer(model.first_sparse_layer);
  proto.set_num_heads(model.num_heads);
  proto.set_head_dim(model.head_dim);
  proto.set_key_dtype(model.key_dtype == KeyDtype::kBf16 ? v1::KEY_DTYPE_BF16
                                                         : v1::KEY_DTYPE_FP8_E4M3);
  proto.set_topk(model.topk);
  proto.set_init_blocks(model.init_blocks);
  proto.set_local_blocks(model.local_blocks);
  proto.set_block_size(kBlockSize);
  proto.set_max_positions(model.max_positions);
  return proto;
}

Engine::Engine(EngineOptions options, std::unique_ptr<Backend> backend)
    : options_(std::move(options)),
      backend_(std::move(backend)),
      cache_(options_.model, options_.num_pages, options_.max_sequences, backend_.get()) {}

absl::StatusOr<v1::OpenSequenceResponse> Engine::OpenSequence(
    const v1::OpenSequenceRequest& request) {
  absl::Duration lease = request.lease_seconds() == 0 ? options_.default_lease
                                                      : absl::Seconds(request.lease_seconds());
  if (lease > options_.max_lease) {
    return absl::InvalidArgumentError(absl::StrCat("lease_seconds ", request.lease_seconds(),
                                                   " exceeds the server's maximum ",
                                                   absl::ToInt64Seconds(options_.max_lease)));
  }
  BLOCKSEL_ASSIGN_OR_RETURN(uint64_t id,
                            cache_.Open(request.sequence_id(), lease, options_.clock()));
  v1::OpenSequenceResponse response;
  response.set_sequence_id(id);
  response.set_lease_seconds(static_cast<uint32_t>(absl::ToInt64Seconds(lease)));
  return response;
}

v1::ReleaseSequenceResponse Engine::ReleaseSequence(const v1::ReleaseSequenceRequest& request) {
  v1::ReleaseSequenceResponse response;
  response.set_released(cache_.Release(request.sequence_id()));
  return response;
}

absl::Status Engine::RenewLease(const v1::RenewLeaseRequest& request) {
  return cache_.Renew(request.sequence_ids(), options_.clock());
}

absl::StatusOr<v1::AppendKeysResponse> Engine::AppendKeys(const v1::AppendKeysRequest& request) {
  const ModelConfig& model = options_.model;
  std::vector<KeyRange> ranges;
  uint64_t tokens = 0;
  for (int i = 0; i < request.appends_size(); ++i) {
    const v1::KeyAppend& append = request.appends(i);
    const uint32_t num_layers = append.num_layers() == 0 ? 1 : append.num_layers();
    if (!model.IsSparseLayer(append.first_layer()) ||
        !model.IsSparseLayer(static_cast<int64_t>(append.first_layer()) + num_layers - 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("append ", i, ": layers [", append.first_layer(), ", ",
                       static_cast<uint64_t>(append.first_layer()) + num_layers,
                       ") are not all sparse; sparse layers are [", model.first_sparse_layer, ", ",
                       model.num_layers, ")"));
    }
    const bool dtype_matches =
        append.key_dtype() == v1::KEY_DTYPE_UNSPECIFIED ||
        (append.key_dtype() == v1::KEY_DTYPE_BF16) == (model.key_dtype == KeyDtype::kBf16);
    if (!dtype_matches) {
      return absl::InvalidArgumentError(
          absl::StrCat("append ", i, ": key_dtype ", v1::KeyDtype_Name(append.key_dtype()),
                       " does not match the server's key dtype ", KeyDtypeName(model.key_dtype)));
    }
    if (append.start_position() > static_cast<uint64_t>(model.max_positions)) {
      return absl::InvalidArgumentError(
          absl::StrCat("append ", i, ": start_position ", append.start_position(),
                       " passes max_positions ", model.max_positions));
    }
    KeyRange range;
    range.sequence_id = append.sequence_id();
    range.first_layer_index = static_cast<int32_t>(append.first_layer()) - model.first_sparse_layer;
    range.num_layers = static_cast<int32_t>(num_layers);
    range.start_position = static_cast<int64_t>(append.start_position());
    range.num_tokens = append.num_tokens();
    range.keys = reinterpret_cast<const uint8_t*>(append.keys().data());
    range.keys_size = static_cast<int64_t>(append.keys().size());
    ranges.push_back(range);
    tokens += static_cast<uint64_t>(append.num_tokens()) * num_layers;
  }
  BLOCKSEL_RETURN_IF_ERROR(cache_.Append(ranges, options_.clock()));
  v1::AppendKeysResponse response;
  response.set_tokens_appended(tokens);
  return response;
}

absl::Status Engine::Select(const v1::SelectRequest& request, v1::Selection* selection) {
  const ModelConfig& model = options_.model;
  BLOCKSEL_ASSIGN_OR_RETURN(SelectPlan plan, PlanSelect(request, model, cache_));
  const absl::Time now = options_.clock();
  if (!plan.appends.empty()) {
    BLOCKSEL_RETURN_IF_ERROR(cache_.Append(plan.appends, now));
  }
  // Block tables are resolved after the appends, which may have grown them.
  std::vector<RowSpan> spans;
  spans.reserve(plan.spans.size());
  for (const PlannedSpan& planned : plan.spans) {
    RowSpan span;
    if (planned.sequence_id != 0) {  // 0: a padding request
      span.block_table = cache_.Find(planned.sequence_id)->block_table.data();
      cache_.Touch(planned.sequence_id, now);
    }
    span.first_position = planned.first_position;
    span.num_rows = planned.num_rows;
    span.first_row = planned.first_row;
    spans.push_back(span);
  }

  std::string block_scores;
  int32_t max_blocks = 0;
  if (request.return_block_scores()) {
    for (const PlannedSpan& planned : plan.spans) {
      const int64_t last = int64_t{planned.first_position} + planned.num_rows - 1;
      if (last >= 0)
        max_blocks = std::max<int32_t>(max_blocks, static_cast<int32_t>(last / kBlockSize + 1));
    }
    max_blocks = std::max(max_blocks, 1);
    const int64_t bytes = int64_t{model.num_heads} * plan.total_rows * max_blocks * 4;
    if (bytes > kMaxBlockScoreBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("block scores of this batch would take ", bytes, " bytes, more than ",
                       kMaxBlockScoreBytes, "; ask for them on smaller batches"));
    }
    block_scores.resize(bytes);
  }
  const int64_t ids_per_head = static_cast<int64_t>(plan.total_rows) * model.topk;
  std::string head_major(ids_per_head * model.num_heads * sizeof(int32_t), '\0');
  SelectionBatch batch;
  batch.spans = spans.data();
  batch.num_spans = static_cast<int32_t>(spans.size());
  batch.queries = reinterpret_cast<const uint16_t*>(request.queries().data());
  batch.total_rows = plan.total_rows;
  batch.block_ids = reinterpret_cast<int32_t*>(head_major.data());
  if (request.return_block_scores()) {
    batch.block_scores = reinterpret_cast<float*>(block_scores.data());
    batch.max_blocks = max_blocks;
  }
  BLOCKSEL_RETURN_IF_ERROR(backend_->Select(plan.layer_index, batch));

  selection->set_num_heads(model.num_heads);
  selection->set_total_q(plan.total_rows);
  selection->set_topk(model.topk);
  selection->set_layout(request.layout());
  if (request.return_block_scores()) {
    selection->set_max_blocks(max_blocks);
    selection->set_block_scores(std::move(block_scores));
  }
  if (request.layout() == v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR) {
    std::string token_major(head_major.size(), '\0');
    const auto* from = reinterpret_cast<const int32_t*>(head_major.data());
    auto* to = reinterpret_cast<int32_t*>(token_major.data());
    for (int32_t head = 0; head < model.num_heads; ++head) {
      for (int32_t row = 0; row < plan.total_rows; ++row) {
        std::copy_n(from + (static_cast<int64_t>(head) * plan.total_rows + row) * model.topk,
                    model.topk,
                    to + (static_cast<int64_t>(row) * model.num_heads + head) * model.topk);
      }
    }
    selection->set_block_ids(std::move(token_major));
  } else {
    selection->set_block_ids(std::move(head_major));
  }
  return absl::OkStatus();
}

void Engine::FillInfo(v1::GetInfoResponse* info) const {
  *info->mutable_model() = ToProto(options_.model);
  const CacheStats stats = cache_.stats();
  v1::CacheStats* cache = info->mutable_cache();
  cache->set_total_pages(stats.total_pages);
  cache->set_free_pages(stats.free_pages);
  cache->set_page_bytes(options_.model.PageBytes());
  cache->set_open_sequences(stats.open_sequences);
  info->set_backend(std::string(backend_->name()));
  info->set_backend_detail(backend_->detail());
  info->set_default_lease_seconds(
      static_cast<uint32_t>(absl::ToInt64Seconds(options_.default_lease)));
}

int64_t Engine::ReleaseExpired() { return cache_.ReleaseExpired(options_.clock()); }

absl::StatusOr<SnapshotSummary> Engine::WriteSnapshot(const std::string& path) {
  return blocksel::WriteSnapshot(path, options_.model, cache_, backend_.get());
}

absl::StatusOr<SnapshotSummary> Engine::LoadSnapshot(const std::string& path) {
  return blocksel::LoadSnapshot(path, options_.model, &cache_, options_.clock());
}

}  // namespace blocksel
