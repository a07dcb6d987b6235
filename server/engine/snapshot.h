// Snapshots of the key cache: every open sequence with its lease, per-layer
// fill and keys, so a planned restart loses no sequence.
#ifndef BLOCKSEL_SERVER_ENGINE_SNAPSHOT_H_
#define BLOCKSEL_SERVER_ENGINE_SNAPSHOT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/engine/backend.h"
#include "server/engine/key_cache.h"
#include "server/engine/model_config.h"

namespace blocksel {

struct SnapshotSummary {
  int64_t sequences = 0;
  int64_t bytes = 0;
};

// Writes the cache to path atomically: a temporary file beside it, fsync,
// rename, fsync of the folder. A CRC-32 over the contents lets a load refuse
// a torn or damaged file. Keys are read back from the store.
absl::StatusOr<SnapshotSummary> WriteSnapshot(const std::string& path, const ModelConfig& model,
                                              const KeyCache& cache, KeyStore* store);

// Restores a snapshot into an empty cache, every lease starting at now.
// NOT_FOUND without a file; DATA_LOSS for a damaged one; FAILED_PRECONDITION
// for one written by a server of another model (layers, head dim, key
// dtype, layers that store keys); RESOURCE_EXHAUSTED when it does not fit.
// On any error the cache is left empty.
absl::StatusOr<SnapshotSummary> LoadSnapshot(const std::string& path, const ModelConfig& model,
                                             KeyCache* cache, absl::Time now);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_SNAPSHOT_H_
