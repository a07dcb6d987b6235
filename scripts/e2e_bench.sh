#!/usr/bin/env bash
# End-to-end benchmark: a blocksel-server on one sparse layer and
# blocksel-loadgen on the same host, closed loop. Each run prints the round
# trips beside the server's stage breakdown (from /metrics) and writes its
# JSON to OUT_DIR:
#   floor_b1_tcp     B=1, one visible block (the fixed cost of a call)
#   decode_b1_tcp, decode_b8_tcp, decode_b64_tcp   L=32K over TCP loopback
#   decode_b8_unix   L=32K over a unix socket
#   decode_b8_x8_unix  8 streams of B=8 L=32K, cross-stream batching on
#                      (a second server, --batch_window_us=$BATCH_WINDOW_US)
#
#   scripts/e2e_bench.sh BIN_DIR OUT_DIR [BACKEND]
#   BIN_DIR holds blocksel-server and blocksel-loadgen (a build's, or a
#   bundle's bin/ with LD_LIBRARY_PATH set); BACKEND: cpu, cuda, ... (auto).
#   SECONDS_EACH (default 8) is the measured time of each run. The runs are
#   also collected in OUT_DIR/e2e_results.json with the card, date and
#   commit (BIN_DIR/../COMMIT, written by scripts/bundle_libs.sh, or git's).
set -euo pipefail
bin=$1
out=$2
backend=${3:-auto}
seconds=${SECONDS_EACH:-8}
window=${BATCH_WINDOW_US:-50}
mkdir -p "$out"
port=${BLOCKSEL_BENCH_PORT:-50151}
metrics_port=$((port + 1))
socket=$(mktemp -u /tmp/blocksel-bench-XXXXXX.sock)
pid=
trap '[[ -n $pid ]] && kill -9 $pid 2>/dev/null; rm -f "$socket"' EXIT

start_server() {  # log name, extra server flags...
  local log=$1
  shift
  "$bin/blocksel-server" --backend="$backend" --listen="127.0.0.1:$port,unix:$socket" \
    --metrics_address="127.0.0.1:$metrics_port" --num_layers=4 --first_sparse_layer=3 \
    --cache_mib=8192 --drain_propagation_seconds=0 --log_level=info "$@" >"$out/$log" 2>&1 &
  pid=$!
  # The server listens once its backend is ready (GPU graphs captured).
  for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
}

stop_server() {
  kill -TERM "$pid"
  wait "$pid"
  pid=
}

run() {  # name, target, loadgen flags...
  local name=$1 target=$2
  shift 2
  echo "== $name" | tee -a "$out/e2e.log"
  "$bin/blocksel-loadgen" --server="$target" --metrics="127.0.0.1:$metrics_port" \
    --context=32768 --duration_seconds="$seconds" --warmup_seconds=2 \
    --json_out="$out/$name.json" "$@" | tee -a "$out/e2e.log"
}

tcp="127.0.0.1:$port"
unix="unix:$socket"
start_server server.log
run floor_b1_tcp "$tcp" --concurrency=1 --batch=1 --context=64 --prefill_tokens=64 \
  --oracle_every=1000
run decode_b1_tcp "$tcp" --concurrency=1 --batch=1 --oracle_every=1000
run decode_b8_tcp "$tcp" --concurrency=1 --batch=8 --oracle_every=400
run decode_b64_tcp "$tcp" --concurrency=1 --batch=64 --oracle_every=100
run decode_b8_unix "$unix" --concurrency=1 --batch=8 --oracle_every=400
stop_server
start_server server_batching.log --batch_window_us="$window"
run decode_b8_x8_unix "$unix" --concurrency=8 --batch=8 --oracle_every=400
stop_server
echo "server: $(grep -m1 'backend ' "$out/server.log")"

commit=$(cat "$bin/../COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
python3 - "$out" "$commit" "${card:-$(nproc) CPU cores}" "$backend" <<'PY'
import datetime, glob, json, os, sys
out, commit, card, backend = sys.argv[1:5]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(out + "/*.json"))
        if not p.endswith("e2e_results.json")}
json.dump({"card": card, "date": datetime.date.today().isoformat(), "commit": commit,
           "backend": backend, "host_cores": os.cpu_count(), "runs": runs},
          open(out + "/e2e_results.json", "w"), indent=1)
PY
