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

# A server where layers 1 and 3 select and layer 2, reusing layer 1, is
# audited: --audit drives layer 2 through the session and reports the
# overlap the server measured.
"$server" --listen="unix:${workdir}/audit.sock" --num_layers=4 --first_sparse_layer=1 \
  --select_every=2 --audit_layers=2 --cache_mib=64 --log_level=info \
  --metrics_address=127.0.0.1:0 --drain_propagation_seconds=0 >"${workdir}/audit_server.log" 2>&1 &
pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*metrics on .*(port \([0-9]*\)).*/\1/p' "${workdir}/audit_server.log" | head -n 1)
  [[ -S ${workdir}/audit.sock && -n $port ]] && break
  sleep 0.1
done
"$loadgen" "${common[@]}" --server="unix:${workdir}/audit.sock" --mode=closed --concurrency=2 \
  --oracle_every=5 --audit \
  --metrics="127.0.0.1:${port}" --json_out="${workdir}/audit.json" | tee "${workdir}/audit.txt"
grep -q '"errors": 0' "${workdir}/audit.json"
grep -q 'reuse audit, layer distance 1: mean overlap' "${workdir}/audit.txt"
grep -q '"reuse_audit": {"1": {"mean_overlap"' "${workdir}/audit.json"
kill -TERM "$pid"
wait "$pid"
echo "loadgen_e2e: closed and open loop ran with every response checked, and the reuse audit"
