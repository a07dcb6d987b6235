#include "server/metrics/server_metrics.h"

#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/loadgen/metrics_scrape.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

// The value of the sample written exactly as `series` (name and labels),
// or -1 when there is none.
double Sample(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.size() > series.size() && line.substr(0, series.size()) == series &&
        line[series.size()] == ' ') {
      double value = 0;
      if (absl::SimpleAtod(line.substr(series.size() + 1), &value)) return value;
    }
  }
  return -1;
}

class ServerMetricsTest : public ::testing::Test {
 protected:
  ServerMetrics metrics_{{{"version", "test"}, {"backend", "cpu"}}};
};

TEST_F(ServerMetricsTest, EverySeriesStartsAtZero) {
  const std::string text = metrics_.Text();
  EXPECT_EQ(Sample(text, R"(blocksel_requests_total{code="OK",method="Select"})"), 0);
  EXPECT_EQ(Sample(text, R"(blocksel_requests_total{code="UNAUTHENTICATED",method="GetInfo"})"), 0);
  EXPECT_EQ(Sample(text, R"(blocksel_backend_duration_seconds_count{path="decode_graph"})"), 0);
  EXPECT_EQ(Sample(text, "blocksel_open_streams"), 0);
  EXPECT_EQ(Sample(text, R"(blocksel_server_info{backend="cpu",version="test"})"), 1);
}

TEST_F(ServerMetricsTest, RequestsCountByMethodAndCode) {
  metrics_.OnRequest(RpcMethod::kSelect, 0, absl::Microseconds(300), 1000, 200);
  metrics_.OnRequest(RpcMethod::kSelect, 0, absl::Milliseconds(3), 1000, 200);
  metrics_.OnRequest(RpcMethod::kStreamSelect, 5, absl::Microseconds(40), 64, 30);
  const std::string text = metrics_.Text();
  EXPECT_EQ(Sample(text, R"(blocksel_requests_total{code="OK",method="Select"})"), 2);
  EXPECT_EQ(Sample(text, R"(blocksel_requests_total{code="NOT_FOUND",method="StreamSelect"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_rpc_duration_seconds_count{method="Select"})"), 2);
  EXPECT_NEAR(Sample(text, R"(blocksel_rpc_duration_seconds_sum{method="Select"})"), 0.0033, 1e-9);
  // 300 us falls in the 0.5 ms bucket, 3 ms does not.
  EXPECT_EQ(Sample(text, R"(blocksel_rpc_duration_seconds_bucket{method="Select",le="0.0005"})"),
            1);
  EXPECT_EQ(Sample(text, "blocksel_received_bytes_total"), 2064);
  EXPECT_EQ(Sample(text, "blocksel_sent_bytes_total"), 430);
}

TEST_F(ServerMetricsTest, EngineEventsMoveTheirSeries) {
  metrics_.OnBackendSelect(SelectPath::kDecodeGraph, absl::Microseconds(25), 6, 6);
  metrics_.OnKeysAppended(3 * 128);
  metrics_.OnQueueDepth(7);
  metrics_.OnQueueWait(absl::Microseconds(10));
  metrics_.OnBackendRunning(+1);
  CacheStats stats;
  stats.total_pages = 100;
  stats.free_pages = 75;
  stats.open_sequences = 3;
  metrics_.OnCacheChanged(stats);
  metrics_.OnStreamOpened();
  const std::string text = metrics_.Text();
  EXPECT_EQ(Sample(text, R"(blocksel_backend_duration_seconds_count{path="decode_graph"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_backend_batch_requests_bucket{le="8"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_backend_batch_requests_bucket{le="4"})"), 0);
  EXPECT_EQ(Sample(text, "blocksel_selected_rows_total"), 6);
  EXPECT_EQ(Sample(text, "blocksel_appended_keys_total"), 384);
  EXPECT_EQ(Sample(text, "blocksel_queue_depth"), 7);
  EXPECT_EQ(Sample(text, "blocksel_queue_wait_seconds_count"), 1);
  EXPECT_EQ(Sample(text, "blocksel_batches_running"), 1);
  EXPECT_EQ(Sample(text, "blocksel_cache_pages_used"), 25);
  EXPECT_EQ(Sample(text, "blocksel_cache_pages_free"), 75);
  EXPECT_EQ(Sample(text, "blocksel_cache_usage_ratio"), 0.25);
  EXPECT_EQ(Sample(text, "blocksel_open_sequences"), 3);
  EXPECT_EQ(Sample(text, "blocksel_open_streams"), 1);
}

// Overlaps land in the histogram of their layer distance, whose series
// exist from the start; a server without an audit has none.
TEST(ServerMetricsAuditTest, ReuseAuditsFillTheOverlapHistogramOfTheirDistance) {
  const std::map<std::string, std::string> labels = {{"version", "test"}};
  EXPECT_EQ(ServerMetrics(labels).Text().find("blocksel_reuse"), std::string::npos);
  ServerMetrics metrics(labels, {1, 3});
  std::string text = metrics.Text();
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_count{layer_distance="3"})"), 0);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_audits_total{layer_distance="1",result="skipped"})"), 0);
  metrics.OnReuseAudit(1, std::vector<double>{1.0, 0.75, 0.5});
  metrics.OnReuseAuditSkipped(3);
  metrics.OnReuseAudit(2, std::vector<double>{0.25});  // no layer is audited at distance 2
  text = metrics.Text();
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_count{layer_distance="1"})"), 3);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_sum{layer_distance="1"})"), 2.25);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_bucket{layer_distance="1",le="0.5"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_bucket{layer_distance="1",le="0.7"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_bucket{layer_distance="1",le="0.8"})"), 2);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_bucket{layer_distance="1",le="0.99"})"), 2);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_bucket{layer_distance="1",le="1"})"), 3);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_audits_total{layer_distance="1",result="compared"})"),
            1);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_audits_total{layer_distance="3",result="skipped"})"), 1);
  EXPECT_EQ(Sample(text, R"(blocksel_reuse_overlap_count{layer_distance="3"})"), 0);
  EXPECT_EQ(text.find(R"(layer_distance="2")"), std::string::npos);
  // What blocksel-loadgen --audit reads of it.
  const std::map<std::string, AuditTotals> audits = ParseAudits(text);
  ASSERT_EQ(audits.size(), 2u);
  EXPECT_EQ(audits.at("1").overlap.count, 3);
  EXPECT_EQ(audits.at("1").overlap.sum, 2.25);
  EXPECT_EQ(audits.at("1").compared, 1);
  EXPECT_EQ(audits.at("3").skipped, 1);
  EXPECT_EQ(audits.at("3").compared, 0);
}

// One answered selection: each stage observed once, with the duration
// between its two points (download takes what upload and compute leave of
// the backend's span).
TEST_F(ServerMetricsTest, SelectStagesSplitTheTimeInTheServer) {
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  SelectTimes times;
  times.received = t0;
  times.queued = t0 + absl::Microseconds(2);
  times.started = t0 + absl::Microseconds(12);
  times.planned = t0 + absl::Microseconds(15);
  times.upload = absl::Microseconds(4);
  times.compute = absl::Microseconds(40);
  times.downloaded = t0 + absl::Microseconds(65);
  times.written = t0 + absl::Microseconds(70);
  metrics_.OnSelectStages(times);
  const std::string text = metrics_.Text();
  const std::map<std::string, double> expected_us = {
      {"receive", 2},  {"queue", 10},   {"plan", 3},   {"upload", 4},
      {"compute", 40}, {"download", 6}, {"respond", 5}};
  double total = 0;
  for (const auto& [stage, micros] : expected_us) {
    EXPECT_EQ(Sample(text, "blocksel_select_stage_seconds_count{stage=\"" + stage + "\"}"), 1)
        << stage;
    const double seconds =
        Sample(text, "blocksel_select_stage_seconds_sum{stage=\"" + stage + "\"}");
    EXPECT_NEAR(seconds, micros * 1e-6, 1e-12) << stage;
    total += seconds;
  }
  EXPECT_NEAR(total, 70e-6, 1e-12);  // the stages cover received -> written
}

TEST_F(ServerMetricsTest, ServesOnAFreePortAndRefusesABusyOne) {
  ASSERT_TRUE(metrics_.Serve("127.0.0.1:0").ok());
  ASSERT_GT(metrics_.port(), 0);
  ServerMetrics other({});
  const absl::Status busy = other.Serve("127.0.0.1:" + std::to_string(metrics_.port()));
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
}

}  // namespace
}  // namespace blocksel
