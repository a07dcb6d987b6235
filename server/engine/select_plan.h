// Validation of a SelectRequest against the model and the cache, producing
// what the engine needs to run it.
#ifndef BLOCKSEL_SERVER_ENGINE_SELECT_PLAN_H_
#define BLOCKSEL_SERVER_ENGINE_SELECT_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "blocksel/v1/block_selector.pb.h"
#include "server/engine/backend.h"
#include "server/engine/key_cache.h"
#include "server/engine/model_config.h"

namespace blocksel {

// Most query rows one batch may hold.
inline constexpr int64_t kMaxBatchRows = int64_t{1} << 20;

// The rows of one request of a batch.
struct PlannedSpan {
  uint64_t sequence_id = 0;  // 0 for a padding request
  int32_t first_position = 0;
  int32_t num_rows = 0;
  int32_t first_row = 0;
};

struct SelectPlan {
  int32_t layer_index = 0;  // key layer index (ModelConfig::KeyLayerIndex)
  bool audit = false;       // a decode batch of an audited layer (SelectRequest.audit)
  int32_t total_rows = 0;
  std::vector<PlannedSpan> spans;
  // Keys the requests carry, to append before selecting. Point into the
  // request, which must outlive the plan.
  std::vector<KeyRange> appends;
};

// Checks every field of request: INVALID_ARGUMENT (layer, audit, dtypes, shapes,
// byte sizes, positions, repeated sequences), NOT_FOUND (sequence not open),
// FAILED_PRECONDITION (keys a row needs are neither in the cache nor in the
// request). Appends themselves are validated when the cache applies them.
//
// With a device payload (may be null) the queries and keys are in it, not
// in the request: a request with keys takes its Q tokens' keys from the
// payload's keys, in request order, and the payload must have room for all
// of them and for the batch's queries and block ids.
absl::StatusOr<SelectPlan> PlanSelect(const v1::SelectRequest& request, const ModelConfig& model,
                                      const KeyCache& cache, const DevicePayload* device);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_SELECT_PLAN_H_
