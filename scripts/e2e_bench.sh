#!/usr/bin/env bash
# End-to-end benchmark: a blocksel-server on one sparse layer and
# blocksel-loadgen over gRPC on loopback, decode steps of B=8 and B=64
# sequences of 32K tokens. Prints round trips beside the server's own
# backend time (from /metrics) and writes the JSON results to OUT_DIR.
#
#   scripts/e2e_bench.sh BIN_DIR OUT_DIR [BACKEND]
#   BIN_DIR holds blocksel-server and blocksel-loadgen (a build's, or a
#   bundle's bin/ with LD_LIBRARY_PATH set); BACKEND: cpu, cuda, ... (auto)
set -euo pipefail
bin=$1
out=$2
backend=${3:-auto}
mkdir -p "$out"
port=${BLOCKSEL_BENCH_PORT:-50151}
metrics_port=$((port + 1))
"$bin/blocksel-server" --backend="$backend" --listen="127.0.0.1:$port" \
  --metrics_address="127.0.0.1:$metrics_port" --num_layers=4 --first_sparse_layer=3 \
  --cache_mib=4096 --drain_propagation_seconds=0 --log_level=info >"$out/server.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
# The server listens once its backend is ready (GPU graphs captured).
for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done

run() {  # name, loadgen flags...
  local name=$1
  shift
  "$bin/blocksel-loadgen" --server="127.0.0.1:$port" --metrics="127.0.0.1:$metrics_port" \
    --context=32768 --duration_seconds=10 --warmup_seconds=2 --json_out="$out/$name.json" "$@" |
    tee -a "$out/e2e.log"
}
run decode_b8 --concurrency=1 --batch=8 --oracle_every=400
run decode_b64 --concurrency=1 --batch=64 --oracle_every=100
run decode_b8_x8 --concurrency=8 --batch=8 --oracle_every=400
kill -TERM "$pid"
wait "$pid"
echo "server: $(grep -m1 'backend ' "$out/server.log")"
