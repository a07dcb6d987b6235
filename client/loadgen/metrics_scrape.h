// Reads the server's backend time from its Prometheus endpoint, so the load
// generator can put the server's own time beside the round trips it saw.
#ifndef BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_
#define BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace blocksel {

// blocksel_backend_duration_seconds _sum and _count of one path label.
struct PathTotals {
  double sum = 0;
  double count = 0;
};
using BackendTimes = std::map<std::string, PathTotals>;

// One plain HTTP/1.0 GET of http://host_port/metrics. UNAVAILABLE when the
// endpoint cannot be reached or answers without metrics.
absl::StatusOr<BackendTimes> ScrapeBackendTimes(const std::string& host_port);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_
