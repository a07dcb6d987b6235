#include "server/engine/engine.h"

#include <algorithm>
#include <bit>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/status_macros.h"
#include "server/engine/wire_enums.h"

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
  for (const int32_t layer : model.SelectingLayerList()) proto.add_selecting_layers(layer);
  for (const int32_t layer : model.audited_layers) proto.add_audited_layers(layer);
  return proto;
}

Engine::Engine(EngineOptions options, std::unique_ptr<Backend> backend)
    : options_(std::move(options)),
      backend_(std::move(backend)),
      cache_(options_.model, options_.num_pages, options_.max_sequences, backend_.get()),
      audit_(options_.model) {}

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
  ReportCache();
  v1::OpenSequenceResponse response;
  response.set_sequence_id(id);
  response.set_lease_seconds(static_cast<uint32_t>(absl::ToInt64Seconds(lease)));
  return response;
}

v1::ReleaseSequenceResponse Engine::ReleaseSequence(const v1::ReleaseSequenceRequest& request) {
  v1::ReleaseSequenceResponse response;
  response.set_released(cache_.Release(request.sequence_id()));
  audit_.Forget(request.sequence_id());
  ReportCache();
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
    for (uint32_t l = 0; l < num_layers; ++l) {
      const int64_t layer = static_cast<int64_t>(append.first_layer()) + l;
      if (model.KeyLayerIndex(layer) < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("append ", i, ": layer ", layer, " reuses the selection of layer ",
                         model.SelectionSource(layer),
                         " and stores no index keys; append keys for the "
                         "selecting and audited layers only (",
                         absl::StrJoin(model.KeyLayerList(), ","), ")"));
      }
    }
    BLOCKSEL_RETURN_IF_ERROR(CheckKeyDtype(append.key_dtype(), model.key_dtype,
                                           absl::StrCat("append ", i, ": key_dtype")));
    if (append.start_position() > static_cast<uint64_t>(model.max_positions)) {
      return absl::InvalidArgumentError(
          absl::StrCat("append ", i, ": start_position ", append.start_position(),
                       " passes max_positions ", model.max_positions));
    }
    KeyRange range;
    range.sequence_id = append.sequence_id();
    range.first_layer_index = model.KeyLayerIndex(append.first_layer());
    range.num_layers = static_cast<int32_t>(num_layers);
    range.start_position = static_cast<int64_t>(append.start_position());
    range.num_tokens = append.num_tokens();
    range.keys = reinterpret_cast<const uint8_t*>(append.keys().data());
    range.keys_size = static_cast<int64_t>(append.keys().size());
    ranges.push_back(range);
    tokens += static_cast<uint64_t>(append.num_tokens()) * num_layers;
  }
  BLOCKSEL_RETURN_IF_ERROR(AppendToCache(ranges));
  v1::AppendKeysResponse response;
  response.set_tokens_appended(tokens);
  return response;
}

namespace {

// Blocks of the longest row of a plan: the width of its block-score rows.
int32_t MaxVisibleBlocks(const SelectPlan& plan) {
  int32_t max_blocks = 1;
  for (const PlannedSpan& planned : plan.spans) {
    const int64_t last = int64_t{planned.first_position} + planned.num_rows - 1;
    if (last >= 0) {
      max_blocks = std::max<int32_t>(max_blocks, VisibleBlocks(last));
    }
  }
  return max_blocks;
}

// Copies the rows [first_row, first_row + rows) of a head-major
// [H, total_rows, topk] id tensor into selection, in the request's layout.
void FillBlockIds(const ModelConfig& model, const int32_t* head_major, int32_t total_rows,
                  int32_t first_row, int32_t rows, v1::BlockIdLayout layout,
                  v1::Selection* selection) {
  std::string ids(static_cast<size_t>(rows) * model.num_heads * model.topk * sizeof(int32_t), '\0');
  auto* to = reinterpret_cast<int32_t*>(ids.data());
  const bool token_major = layout == v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR;
  for (int32_t head = 0; head < model.num_heads; ++head) {
    for (int32_t row = 0; row < rows; ++row) {
      const int64_t to_row =
          token_major ? int64_t{row} * model.num_heads + head : int64_t{head} * rows + row;
      std::copy_n(head_major + (int64_t{head} * total_rows + first_row + row) * model.topk,
                  model.topk, to + to_row * model.topk);
    }
  }
  selection->set_num_heads(model.num_heads);
  selection->set_total_q(rows);
  selection->set_topk(model.topk);
  selection->set_layout(layout);
  selection->set_block_ids(std::move(ids));
}

// The answer to an audit batch: no rows, since the layer's blocks are its
// source's (the client has them).
void SetAuditAnswer(const ModelConfig& model, v1::BlockIdLayout layout, v1::Selection* selection) {
  selection->set_num_heads(model.num_heads);
  selection->set_total_q(0);
  selection->set_topk(model.topk);
  selection->set_layout(layout);
}

}  // namespace

absl::StatusOr<SelectPlan> Engine::PlanChecked(const v1::SelectRequest& request,
                                               const DevicePayload* device) const {
  const ModelConfig& model = options_.model;
  BLOCKSEL_ASSIGN_OR_RETURN(SelectPlan plan, PlanSelect(request, model, cache_, device));
  if (request.return_block_scores()) {
    const int64_t bytes =
        int64_t{model.num_heads} * plan.total_rows * MaxVisibleBlocks(plan) * int64_t{4};
    if (bytes > kMaxBlockScoreBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("block scores of this batch would take ", bytes, " bytes, more than ",
                       kMaxBlockScoreBytes, "; ask for them on smaller batches"));
    }
  }
  return plan;
}

absl::Status Engine::Select(const v1::SelectRequest& request, v1::Selection* selection) {
  SelectCall call{&request, selection, absl::OkStatus()};
  bool done = false;
  SelectMany(absl::MakeSpan(&call, 1), [&done] { done = true; });
  while (!done) FinishSelections(/*wait=*/true);
  return call.status;
}

void Engine::SelectMany(absl::Span<SelectCall> calls, absl::AnyInvocable<void()> done) {
  const uint64_t group = next_group_++;
  groups_.push_back({group, 0, std::move(done)});
  std::vector<PreparedCall> launch;
  std::vector<KeyWrite> writes;  // keys the launch's calls carry
  absl::flat_hash_set<uint64_t> launch_sequences;
  bool launch_alone = false;  // the launch takes no further call
  auto flush = [&] {
    if (!launch.empty()) Launch(std::move(launch), writes, group);
    launch.clear();
    writes.clear();
    launch_sequences.clear();
    launch_alone = false;
  };
  for (SelectCall& call : calls) {
    absl::StatusOr<SelectPlan> plan = PlanChecked(*call.request, call.device);
    if (!plan.ok()) {
      call.status = plan.status();
      continue;
    }
    const bool alone = call.request->return_block_scores() || call.device != nullptr;
    bool conflicts = launch_alone || alone;
    for (const PlannedSpan& span : plan->spans) {
      conflicts = conflicts || launch_sequences.contains(span.sequence_id);
    }
    // The earlier calls must read their keys before this call's appends.
    if (conflicts) flush();
    if (plan->audit && !audit_.TakeTurn(static_cast<int32_t>(call.request->layer()))) {
      // Not its turn to be compared: the batch only stores its keys.
      if (!plan->appends.empty()) {
        call.status = AppendToCache(plan->appends);
        if (!call.status.ok()) continue;
      }
      if (call.times != nullptr) call.times->planned = call.times->downloaded = absl::Now();
      SetAuditAnswer(options_.model, call.request->layout(), call.selection);
      continue;
    }
    if (!plan->appends.empty()) {
      call.status = AppendToCache(plan->appends, &writes);
      if (!call.status.ok()) continue;
    }
    for (const PlannedSpan& span : plan->spans) {
      if (span.sequence_id != 0) launch_sequences.insert(span.sequence_id);
    }
    if (call.times != nullptr) call.times->planned = absl::Now();
    launch_alone = alone;
    launch.push_back({&call, std::move(*plan)});
  }
  flush();
  RunDueCallbacks();
}

void Engine::Launch(std::vector<PreparedCall> calls, absl::Span<const KeyWrite> writes,
                    uint64_t group) {
  const ModelConfig& model = options_.model;
  const absl::Time now = options_.clock();
  // Block tables are resolved after every append of the launch, which may
  // have grown them.
  std::vector<RowSpan> spans;
  int32_t total_rows = 0;
  for (const PreparedCall& prepared : calls) {
    for (const PlannedSpan& planned : prepared.plan.spans) {
      RowSpan span;
      if (planned.sequence_id != 0) {  // 0: a padding request
        const Sequence* sequence = cache_.Find(planned.sequence_id);
        span.block_table = sequence->block_table.data();
        span.table_slot = sequence->table_slot;
        cache_.Touch(planned.sequence_id, now);
      }
      span.first_position = planned.first_position;
      span.num_rows = planned.num_rows;
      span.first_row = total_rows + planned.first_row;
      spans.push_back(span);
    }
    total_rows += prepared.plan.total_rows;
  }

  // One request's queries are used in place; a merged launch packs them.
  std::string packed_queries;
  const std::string* queries = &calls.front().call->request->queries();
  if (calls.size() > 1) {
    for (const PreparedCall& prepared : calls) packed_queries += prepared.call->request->queries();
    queries = &packed_queries;
  }
  const DevicePayload* device = calls.front().call->device;  // such a call launches alone

  StartedLaunch started;
  started.total_rows = total_rows;
  started.prefill = calls.front().call->request->has_prefill();
  // Block scores only come from a launch of one call (see SelectMany).
  if (calls.front().call->request->return_block_scores()) {
    started.max_blocks = MaxVisibleBlocks(calls.front().plan);
    started.block_scores.resize(size_t{4} * model.num_heads * total_rows * started.max_blocks);
  }
  started.head_major.resize(static_cast<size_t>(total_rows) * model.num_heads * model.topk);
  SelectionBatch batch;
  batch.spans = spans.data();
  batch.num_spans = static_cast<int32_t>(spans.size());
  batch.queries =
      static_cast<const uint16_t*>(device != nullptr ? device->queries : queries->data());
  batch.total_rows = total_rows;
  batch.block_ids = started.head_major.data();
  if (started.max_blocks > 0) {
    batch.block_scores = reinterpret_cast<float*>(started.block_scores.data());
    batch.max_blocks = started.max_blocks;
  }
  // The backend holds a few launches at most: the oldest makes room.
  while (backend_->pending() >= backend_->max_pending()) FinishOldest();
  if (options_.observer != nullptr) options_.observer->OnBackendRunning(+1);
  started.started = absl::Now();
  const absl::Status status =
      backend_->Start(calls.front().plan.layer_index, batch, writes, device);
  select_launches_.fetch_add(1, std::memory_order_relaxed);
  if (!status.ok()) {
    if (options_.observer != nullptr) options_.observer->OnBackendRunning(-1);
    for (PreparedCall& prepared : calls) prepared.call->status = status;
    return;
  }
  started.calls = std::move(calls);
  started.group = group;
  for (PendingGroup& pending : groups_) {
    if (pending.id == group) ++pending.unfinished;
  }
  started_.push_back(std::move(started));
}

bool Engine::FinishSelections(bool wait) {
  while (!started_.empty() && (wait || backend_->OldestReady())) FinishOldest();
  RunDueCallbacks();
  return !started_.empty();
}

void Engine::FinishOldest() {
  const ModelConfig& model = options_.model;
  StartedLaunch launch = std::move(started_.front());
  started_.pop_front();
  const absl::StatusOr<SelectionReport> report = backend_->FinishOldest();
  const absl::Time downloaded = absl::Now();
  EngineObserver* const observer = options_.observer;
  if (observer != nullptr) {
    observer->OnBackendRunning(-1);
    if (report.ok()) {
      const SelectPath path = launch.prefill                       ? SelectPath::kPrefill
                              : report->mode == LaunchMode::kGraph ? SelectPath::kDecodeGraph
                                                                   : SelectPath::kDecodeDirect;
      observer->OnBackendSelect(path, downloaded - launch.started,
                                static_cast<int64_t>(launch.calls.size()), launch.total_rows);
    }
  }
  const absl::Status status = report.status();
  int32_t first_row = 0;
  for (PreparedCall& prepared : launch.calls) {
    SelectCall& call = *prepared.call;
    call.status = status;
    if (status.ok()) {
      if (call.times != nullptr) {
        call.times->upload = report->upload;
        call.times->compute = report->compute;
        call.times->downloaded = downloaded;
      }
      AuditRows(prepared, launch, first_row);
      if (prepared.plan.audit) {
        SetAuditAnswer(model, call.request->layout(), call.selection);
      } else if (call.selection != nullptr) {  // a device payload's ids are in its slot
        FillBlockIds(model, launch.head_major.data(), launch.total_rows, first_row,
                     prepared.plan.total_rows, call.request->layout(), call.selection);
      }
      if (launch.max_blocks > 0) {
        call.selection->set_max_blocks(launch.max_blocks);
        call.selection->set_block_scores(std::move(launch.block_scores));
      }
    }
    first_row += prepared.plan.total_rows;
  }
  for (PendingGroup& pending : groups_) {
    if (pending.id == launch.group) --pending.unfinished;
  }
}

void Engine::AuditRows(const PreparedCall& prepared, const StartedLaunch& launch,
                       int32_t first_row) {
  const v1::SelectRequest& request = *prepared.call->request;
  const int32_t layer = static_cast<int32_t>(request.layer());
  if (!request.has_decode() || (!prepared.plan.audit && !audit_.IsSource(layer))) return;
  const int32_t distance = layer - options_.model.SelectionSource(layer);
  for (const PlannedSpan& span : prepared.plan.spans) {
    if (span.sequence_id == 0) continue;  // padding
    const LaunchRows rows{launch.head_major.data(), launch.total_rows, first_row + span.first_row,
                          span.num_rows, span.first_position};
    if (!prepared.plan.audit) {
      audit_.Remember(layer, span.sequence_id, rows);
      continue;
    }
    const std::optional<std::vector<double>> overlaps =
        audit_.Compare(layer, span.sequence_id, rows);
    if (options_.observer == nullptr) continue;
    if (overlaps.has_value()) {
      options_.observer->OnReuseAudit(distance, *overlaps);
    } else {
      options_.observer->OnReuseAuditSkipped(distance);
    }
  }
}

void Engine::RunDueCallbacks() {
  while (!groups_.empty() && groups_.front().unfinished == 0) {
    absl::AnyInvocable<void()> done = std::move(groups_.front().done);
    groups_.pop_front();
    if (done) done();
  }
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

int64_t Engine::ReleaseExpired() {
  const int64_t released = cache_.ReleaseExpired(options_.clock());
  if (released > 0) {
    audit_.ForgetClosed([this](uint64_t id) { return cache_.Find(id) != nullptr; });
    ReportCache();
  }
  return released;
}

void Engine::ReportCache() const {
  if (options_.observer != nullptr) options_.observer->OnCacheChanged(cache_.stats());
}

absl::Status Engine::AppendToCache(absl::Span<const KeyRange> ranges,
                                   std::vector<KeyWrite>* deferred) {
  BLOCKSEL_RETURN_IF_ERROR(cache_.Append(ranges, options_.clock(), deferred));
  if (options_.observer != nullptr) {
    int64_t keys = 0;
    for (const KeyRange& range : ranges) keys += range.num_tokens * range.num_layers;
    options_.observer->OnKeysAppended(keys);
    options_.observer->OnCacheChanged(cache_.stats());
  }
  return absl::OkStatus();
}

absl::StatusOr<SnapshotSummary> Engine::WriteSnapshot(const std::string& path) {
  return blocksel::WriteSnapshot(path, options_.model, cache_, backend_.get());
}

absl::StatusOr<SnapshotSummary> Engine::LoadSnapshot(const std::string& path) {
  absl::StatusOr<SnapshotSummary> loaded =
      blocksel::LoadSnapshot(path, options_.model, &cache_, options_.clock());
  ReportCache();
  return loaded;
}

}  // namespace blocksel
