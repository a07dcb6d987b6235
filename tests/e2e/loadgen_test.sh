#!/usr/bin/env bash
# Runs blocksel-loadgen briefly, closed and open loop with a prefill mix,
# against a real server. The load generator exits non-zero on any error or
# any response that fails its structural or reference check.
set -euo pipefail
server=$1
loadgen=$2
workdir=$(mktemp -d)
socket="unix:${workdir}/blocksel.sock"
"$server" --listen="$socket" --num_layers=2 --first_sparse_layer=1 --cache_mib=64 \
  --log_level=warn --metrics_address= --drain_propagation_seconds=0 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$workdir"' EXIT
for _ in $(seq 100); do [[ -S ${workdir}/blocksel.sock ]] && break; sleep 0.1; done

common=(--server="$socket" --batch=4 --context=3000 --duration_seconds=2 --warmup_seconds=0.5)
"$loadgen" "${common[@]}" --mode=closed --concurrency=2 --oracle_every=5 \
  --json_out="${workdir}/closed.json"
# A light open-loop rate, so that sanitizer builds keep up too.
"$loadgen" "${common[@]}" --mode=open --rate=10 --concurrency=2 --decode_fraction=0.75 \
  --prefill_tokens=64 --oracle_every=3
grep -q '"errors": 0' "${workdir}/closed.json"
grep -q '"reference_checked": [1-9]' "${workdir}/closed.json"
kill -TERM "$pid"
wait "$pid"
echo "loadgen_e2e: closed and open loop ran with every response checked"
