#include "server/engine/select_plan.h"

#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "server/common/status_macros.h"
#include "server/engine/wire_enums.h"

namespace blocksel {
namespace {

// What one request asks for, independent of prefill or decode.
struct RowRequest {
  uint64_t sequence_id;
  int64_t first_position;  // may be negative for decode padding
  int64_t num_rows;
  const std::string* keys;
  bool padding;
};

absl::Status CheckEnums(const v1::SelectRequest& request, const ModelConfig& model) {
  BLOCKSEL_RETURN_IF_ERROR(CheckQueryDtype(request.query_dtype()));
  BLOCKSEL_RETURN_IF_ERROR(CheckKeyDtype(request.key_dtype(), model.key_dtype, "key_dtype"));
  return CheckLayout(request.layout());
}

absl::StatusOr<std::vector<RowRequest>> CollectRows(const v1::SelectRequest& request,
                                                    const ModelConfig& model) {
  std::vector<RowRequest> rows;
  if (request.has_prefill()) {
    const v1::PrefillBatch& batch = request.prefill();
    for (int i = 0; i < batch.requests_size(); ++i) {
      const v1::PrefillRequest& r = batch.requests(i);
      if (r.q_len() < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("prefill request ", i, ": q_len must be >= 1"));
      }
      if (r.prefix_len() > static_cast<uint64_t>(model.max_positions) ||
          r.prefix_len() + r.q_len() > static_cast<uint64_t>(model.max_positions)) {
        return absl::InvalidArgumentError(
            absl::StrCat("prefill request ", i, ": positions [", r.prefix_len(), ", ",
                         r.prefix_len() + r.q_len(), ") pass max_positions ", model.max_positions));
      }
      rows.push_back(
          {r.sequence_id(), static_cast<int64_t>(r.prefix_len()), r.q_len(), &r.keys(), false});
    }
  } else if (request.has_decode()) {
    const v1::DecodeBatch& batch = request.decode();
    const int64_t batch_q = batch.tokens_per_request() == 0 ? 1 : batch.tokens_per_request();
    for (int i = 0; i < batch.requests_size(); ++i) {
      const v1::DecodeRequest& r = batch.requests(i);
      const int64_t q = r.query_tokens() == 0 ? batch_q : r.query_tokens();
      if (r.seq_len() == 0) {
        if (!r.keys().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "decode request ", i, ": a padding request (seq_len 0) carries no keys"));
        }
        rows.push_back({0, -q, q, &r.keys(), true});
        continue;
      }
      if (r.seq_len() < static_cast<uint64_t>(q)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "decode request ", i, ": seq_len ", r.seq_len(), " is smaller than its Q = ", q,
            "; seq_len counts the new tokens (0 marks padding)"));
      }
      if (r.seq_len() > static_cast<uint64_t>(model.max_positions)) {
        return absl::InvalidArgumentError(absl::StrCat("decode request ", i, ": seq_len ",
                                                       r.seq_len(), " passes max_positions ",
                                                       model.max_positions));
      }
      rows.push_back({r.sequence_id(), static_cast<int64_t>(r.seq_len()) - q, q, &r.keys(), false});
    }
  } else {
    return absl::InvalidArgumentError("set prefill or decode in the SelectRequest");
  }
  if (rows.empty()) {
    return absl::InvalidArgumentError("the batch has no requests");
  }
  return rows;
}

// Where a device payload's bytes run out: INVALID_ARGUMENT naming the part.
absl::Status CheckRoom(absl::string_view part, int64_t needed, int64_t room) {
  if (needed <= room) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("the batch needs ", needed, " bytes of ", part,
                                                 " but its slot holds ", room,
                                                 "; attach with room for the largest batch"));
}

}  // namespace

absl::StatusOr<SelectPlan> PlanSelect(const v1::SelectRequest& request, const ModelConfig& model,
                                      const KeyCache& cache, const DevicePayload* device) {
  if (!model.IsSparseLayer(request.layer())) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", request.layer(), " is not a sparse layer; sparse layers are [",
                     model.first_sparse_layer, ", ", model.num_layers, ")"));
  }
  const int32_t source = model.SelectionSource(request.layer());
  if (request.audit()) {
    if (!model.IsAudited(request.layer())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer ", request.layer(), " is not audited (audited layers: ",
          model.audited_layers.empty() ? "none" : absl::StrJoin(model.audited_layers, ","),
          "); send audit batches only for GetInfo's audited_layers"));
    }
    if (!request.has_decode() || request.return_block_scores()) {
      return absl::InvalidArgumentError(
          absl::StrCat("an audit batch (layer ", request.layer(),
                       ") must be a decode batch without return_block_scores; got ",
                       request.has_decode() ? "return_block_scores" : "no decode batch"));
    }
  } else if (!model.IsSelecting(request.layer())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", request.layer(), " reuses the selection of layer ", source,
        " and is not selected on the server; select layer ", source, " and use its block ids"));
  }
  BLOCKSEL_RETURN_IF_ERROR(CheckEnums(request, model));
  absl::StatusOr<std::vector<RowRequest>> rows = CollectRows(request, model);
  if (!rows.ok()) return rows.status();

  SelectPlan plan;
  plan.layer_index = model.KeyLayerIndex(request.layer());
  plan.audit = request.audit();
  const char* kind = request.has_prefill() ? "prefill" : "decode";
  absl::flat_hash_set<uint64_t> seen;
  int64_t total_rows = 0;
  int64_t device_key_bytes = 0;  // of the payload's keys, taken so far
  for (size_t i = 0; i < rows->size(); ++i) {
    const RowRequest& row = (*rows)[i];
    if (total_rows + row.num_rows > kMaxBatchRows) {
      return absl::InvalidArgumentError(
          absl::StrCat("the batch has more than ", kMaxBatchRows, " query rows; split it"));
    }
    PlannedSpan span;
    span.first_position = static_cast<int32_t>(row.first_position);
    span.num_rows = static_cast<int32_t>(row.num_rows);
    span.first_row = static_cast<int32_t>(total_rows);
    total_rows += row.num_rows;
    if (row.padding) {
      plan.spans.push_back(span);
      continue;
    }
    span.sequence_id = row.sequence_id;
    const std::string where =
        absl::StrCat(kind, " request ", i, " (sequence ", row.sequence_id, ")");
    if (!seen.insert(row.sequence_id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": a sequence may appear once per batch"));
    }
    const Sequence* sequence = cache.Find(row.sequence_id);
    if (sequence == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(where,
                       ": sequence is not open (never opened, released, or its lease "
                       "expired)"));
    }
    const int64_t end = row.first_position + row.num_rows;
    const bool has_keys = device != nullptr ? device->keys != nullptr : !row.keys->empty();
    if (has_keys) {
      KeyRange range;
      range.sequence_id = row.sequence_id;
      range.first_layer_index = plan.layer_index;
      range.num_layers = 1;
      range.start_position = row.first_position;
      range.num_tokens = row.num_rows;
      if (device != nullptr) {
        range.keys = device->keys + device_key_bytes;
        range.keys_size = row.num_rows * model.TokenBytes();
        device_key_bytes += range.keys_size;
        BLOCKSEL_RETURN_IF_ERROR(CheckRoom("keys", device_key_bytes, device->key_bytes));
      } else {
        range.keys = reinterpret_cast<const uint8_t*>(row.keys->data());
        range.keys_size = static_cast<int64_t>(row.keys->size());
      }
      if (range.keys_size != row.num_rows * model.TokenBytes()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": keys must be empty or ", row.num_rows * model.TokenBytes(),
                         " bytes ([", row.num_rows, " tokens, ", model.head_dim, " x ",
                         KeyDtypeName(model.key_dtype), "]), got ", range.keys_size));
      }
      plan.appends.push_back(range);
    } else if (sequence->layer_fill[plan.layer_index] < end) {
      return absl::FailedPreconditionError(absl::StrCat(
          where, ": layer ", request.layer(), " holds ", sequence->layer_fill[plan.layer_index],
          " tokens but rows up to position ", end - 1, " need keys 0..", end - 1,
          "; append them first or send them in the request's keys"));
    }
    plan.spans.push_back(span);
  }
  plan.total_rows = static_cast<int32_t>(total_rows);

  const int64_t query_bytes = total_rows * model.num_heads * model.head_dim * int64_t{2};
  if (device != nullptr) {
    BLOCKSEL_RETURN_IF_ERROR(CheckRoom("queries", query_bytes, device->query_bytes));
    BLOCKSEL_RETURN_IF_ERROR(CheckRoom(
        "block ids", total_rows * model.num_heads * model.topk * int64_t{4}, device->ids_bytes));
    return plan;
  }
  if (static_cast<int64_t>(request.queries().size()) != query_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries must be ", query_bytes, " bytes ([", total_rows, " rows, ", model.num_heads,
        " heads, ", model.head_dim, "] bf16), got ", request.queries().size()));
  }
  return plan;
}

}  // namespace blocksel
