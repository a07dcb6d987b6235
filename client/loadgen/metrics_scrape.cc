#include "client/loadgen/metrics_scrape.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace blocksel {
namespace {

absl::StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("'", host_port, "' is not host:port"));
  }
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &addresses) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", host_port));
  }
  int fd = -1;
  for (addrinfo* a = addresses; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(addresses);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", host_port));
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host, "\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot send to ", host_port));
  }
  std::string response;
  char buffer[65536];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) response.append(buffer, n);
  close(fd);
  return response;
}

}  // namespace

HistogramTotals ParseHistogram(absl::string_view text, absl::string_view name,
                               absl::string_view label) {
  const std::string sum_prefix = absl::StrCat(name, "_sum{", label, "=\"");
  const std::string count_prefix = absl::StrCat(name, "_count{", label, "=\"");
  HistogramTotals totals;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    const bool sum = absl::StartsWith(line, sum_prefix);
    if (!sum && !absl::StartsWith(line, count_prefix)) continue;
    line.remove_prefix(sum ? sum_prefix.size() : count_prefix.size());
    const size_t quote = line.find('"');
    const size_t space = line.rfind(' ');
    double value = 0;
    if (quote == absl::string_view::npos || space == absl::string_view::npos ||
        !absl::SimpleAtod(line.substr(space + 1), &value)) {
      continue;
    }
    SeriesTotals& series = totals[std::string(line.substr(0, quote))];
    (sum ? series.sum : series.count) = value;
  }
  return totals;
}

double ParseSample(absl::string_view text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    double value = 0;
    if (absl::ConsumePrefix(&line, series) && absl::ConsumePrefix(&line, " ") &&
        absl::SimpleAtod(line, &value)) {
      return value;
    }
  }
  return 0;
}

std::map<std::string, AuditTotals> ParseAudits(absl::string_view text) {
  std::map<std::string, AuditTotals> audits;
  for (const auto& [distance, overlap] :
       ParseHistogram(text, "blocksel_reuse_overlap", "layer_distance")) {
    AuditTotals& totals = audits[distance];
    totals.overlap = overlap;
    const std::string prefix =
        absl::StrCat("blocksel_reuse_audits_total{layer_distance=\"", distance, "\",result=\"");
    totals.compared = ParseSample(text, absl::StrCat(prefix, "compared\"}"));
    totals.skipped = ParseSample(text, absl::StrCat(prefix, "skipped\"}"));
  }
  return audits;
}

absl::StatusOr<ServerTimes> ScrapeServerTimes(const std::string& host_port) {
  absl::StatusOr<std::string> text = HttpGet(host_port, "/metrics");
  if (!text.ok()) return text.status();
  ServerTimes times;
  times.backend = ParseHistogram(*text, "blocksel_backend_duration_seconds", "path");
  times.stages = ParseHistogram(*text, "blocksel_select_stage_seconds", "stage");
  times.colocated = ParseHistogram(*text, "blocksel_colocated_stage_seconds", "stage");
  times.audits = ParseAudits(*text);
  if (times.backend.empty() || times.stages.empty()) {
    return absl::UnavailableError(
        absl::StrCat("no blocksel timing metrics at http://", host_port, "/metrics"));
  }
  return times;
}

}  // namespace blocksel
