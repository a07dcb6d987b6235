#!/usr/bin/env bash
# Scrapes a live blocksel-server after the demo ran against it: the
# exposition must pass `promtool check metrics`, and the series the demo
# drove must have moved. Arguments after the two binaries go to the server;
# EXPECT_AUDIT_DISTANCES, if set, lists the layer distances whose reuse
# audit series must have moved.
set -euo pipefail
server=$1
demo=$2
shift 2
if ! command -v promtool >/dev/null || ! command -v curl >/dev/null; then
  echo "metrics_scrape_e2e: needs promtool and curl (scripts/setup.sh installs them)" >&2
  exit 1
fi
workdir=$(mktemp -d)
socket="unix:${workdir}/blocksel.sock"
"$server" --listen="$socket" --cache_mib=256 --log_level=info --drain_propagation_seconds=0 \
  --metrics_address=127.0.0.1:0 "$@" >"${workdir}/server.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$workdir"' EXIT

"$demo" --server="$socket" --prompt_tokens=1500 --decode_steps=2 --wait_seconds=30 >/dev/null
port=$(sed -n 's/.*metrics on .*(port \([0-9]*\)).*/\1/p' "${workdir}/server.log" | head -n 1)
if [[ -z $port ]]; then
  echo "no metrics port in the server log:" >&2
  cat "${workdir}/server.log" >&2
  exit 1
fi
curl -sf "http://127.0.0.1:${port}/metrics" >"${workdir}/metrics.txt"
promtool check metrics <"${workdir}/metrics.txt"

# value NAME LABELS: the sample of NAME whose labels contain LABELS.
value() {
  grep "^$1{" "${workdir}/metrics.txt" | grep -F "$2" | awk '{print $2}' | head -n 1
}
fail=0
expect_positive() {  # description, value
  if ! awk -v v="$2" 'BEGIN {exit !(v > 0)}'; then
    echo "expected $1 > 0, got '$2'" >&2
    fail=1
  fi
}
expect_positive "OpenSequence OK requests" "$(value blocksel_requests_total 'code="OK",method="OpenSequence"')"
expect_positive "StreamSelect OK requests" "$(value blocksel_requests_total 'code="OK",method="StreamSelect"')"
expect_positive "appended keys" "$(grep '^blocksel_appended_keys_total ' "${workdir}/metrics.txt" | awk '{print $2}')"
expect_positive "decode backend selections" "$(value blocksel_backend_duration_seconds_count 'path="decode_direct"')"
expect_positive "queue waits" "$(grep '^blocksel_queue_wait_seconds_count ' "${workdir}/metrics.txt" | awk '{print $2}')"
expect_positive "server info" "$(value blocksel_server_info 'backend="cpu"')"
for distance in ${EXPECT_AUDIT_DISTANCES:-}; do
  expect_positive "reuse overlaps at layer distance $distance" \
    "$(value blocksel_reuse_overlap_count "layer_distance=\"$distance\"")"
  expect_positive "reuse audits compared at layer distance $distance" \
    "$(value blocksel_reuse_audits_total "layer_distance=\"$distance\",result=\"compared\"")"
done
[[ $fail -eq 0 ]] || exit 1

kill -TERM "$pid"
wait "$pid"
echo "metrics_scrape_e2e: $(grep -c '^blocksel_' "${workdir}/metrics.txt") samples passed promtool; the demo's requests are counted"
