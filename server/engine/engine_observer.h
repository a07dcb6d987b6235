// What the engine and its executor report while they run, for metrics.
#ifndef BLOCKSEL_SERVER_ENGINE_ENGINE_OBSERVER_H_
#define BLOCKSEL_SERVER_ENGINE_ENGINE_OBSERVER_H_

#include <cstdint>

#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/engine/key_cache.h"

namespace blocksel {

// How a backend selection ran: prefill, or decode from a captured graph or
// from direct launches.
enum class SelectPath { kPrefill, kDecodeGraph, kDecodeDirect };

// Every method has a no-op default. They are called on the engine thread,
// except OnQueueDepth, which is also called by threads that submit work;
// implementations must be thread-safe and must not block.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // One backend selection of `requests` requests (more than one when
  // batched) and `rows` query rows.
  virtual void OnBackendSelect(SelectPath /*path*/, absl::Duration /*elapsed*/,
                               int64_t /*requests*/, int64_t /*rows*/) {}
  // A selection started (+1) or ended (-1) on the backend.
  virtual void OnBackendRunning(int /*delta*/) {}
  // Keys written to the cache: tokens times layers.
  virtual void OnKeysAppended(int64_t /*keys*/) {}
  // The cache after an operation that may have changed it.
  virtual void OnCacheChanged(const CacheStats& /*stats*/) {}
  // An operation left the queue after waiting this long.
  virtual void OnQueueWait(absl::Duration /*wait*/) {}
  // Operations waiting now.
  virtual void OnQueueDepth(int64_t /*depth*/) {}
  // A reuse audit of one sequence's rows: per (head, row), the share of the
  // source's blocks that the audited layer, `layer_distance` layers after
  // it, selects too (reuse_audit.h).
  virtual void OnReuseAudit(int32_t /*layer_distance*/, absl::Span<const double> /*overlaps*/) {}
  // A reuse audit of one sequence skipped: its source had no selection at
  // the same positions.
  virtual void OnReuseAuditSkipped(int32_t /*layer_distance*/) {}
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_ENGINE_OBSERVER_H_
