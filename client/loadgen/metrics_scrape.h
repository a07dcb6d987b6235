// Reads the server's own timings from its Prometheus endpoint, so the load
// generator can put them beside the round trips it saw.
#ifndef BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_
#define BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace blocksel {

// _sum and _count of one series of a histogram.
struct SeriesTotals {
  double sum = 0;
  double count = 0;
};
// The series of one histogram, by the value of one label.
using HistogramTotals = std::map<std::string, SeriesTotals>;

// The reuse audit's totals for one layer distance.
struct AuditTotals {
  SeriesTotals overlap;  // blocksel_reuse_overlap: one observation per (head, row)
  double compared = 0;   // blocksel_reuse_audits_total by result: sequence audits
  double skipped = 0;
};

// The metrics the load generator reads.
struct ServerTimes {
  HistogramTotals backend;    // blocksel_backend_duration_seconds by path
  HistogramTotals stages;     // blocksel_select_stage_seconds by stage
  HistogramTotals colocated;  // blocksel_colocated_stage_seconds by stage
  // By layer distance; empty unless the server audits reuse.
  std::map<std::string, AuditTotals> audits;
};

// The series of histogram `name` by label `label`, from a scrape's text.
HistogramTotals ParseHistogram(absl::string_view text, absl::string_view name,
                               absl::string_view label);

// The value of the sample written exactly as `series` (name and labels), 0
// when there is none.
double ParseSample(absl::string_view text, absl::string_view series);

// The reuse audit's series by layer distance, from a scrape's text.
std::map<std::string, AuditTotals> ParseAudits(absl::string_view text);

// One plain HTTP/1.0 GET of http://host_port/metrics. UNAVAILABLE when the
// endpoint cannot be reached or answers without blocksel's metrics.
absl::StatusOr<ServerTimes> ScrapeServerTimes(const std::string& host_port);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_LOADGEN_METRICS_SCRAPE_H_
