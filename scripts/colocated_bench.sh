#!/usr/bin/env bash
# The co-located GPU data plane, two processes on one GPU: blocksel-server
# on the cuda backend (one sparse layer, L=32K sequences) and
# colocated_bench as the worker. Each run checks the worker's selections
# against the gRPC path and times them on the worker's stream (post, wait,
# whole; the same in a worker graph; the gRPC round trip beside them):
#   b1, b8, b64         one worker at B=1, 8, 64
#   four_workers_b8     four workers at B=8 at once against one server
# With MPS=1 the same again under the MPS control daemon (when it starts;
# the log says when it does not). JSON lines go to OUT_DIR/colocated.jsonl.
#
#   scripts/colocated_bench.sh BIN_DIR OUT_DIR
#   BIN_DIR holds blocksel-server and colocated_bench (a bundle's bin/ with
#   LD_LIBRARY_PATH set).
set -euo pipefail
bin=$1
out=$2
mkdir -p "$out"
results=$out/colocated.jsonl
: >"$results"
socket=$(mktemp -u /tmp/blocksel-colocated-XXXXXX.sock)
metrics=127.0.0.1:${BLOCKSEL_BENCH_PORT:-50161}
pid=
trap '[[ -n $pid ]] && kill -9 $pid 2>/dev/null; rm -f "$socket"' EXIT

start_server() {  # log name
  "$bin/blocksel-server" --backend=cuda --listen="unix:$socket" --metrics_address="$metrics" \
    --num_layers=4 --first_sparse_layer=3 --cache_mib=4096 --drain_propagation_seconds=0 \
    >"$out/$1" 2>&1 &
  pid=$!
  for _ in $(seq 300); do [[ -S $socket ]] && break; sleep 0.2; done
}

stop_server() {
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
}

runs() {  # mode label
  local mode=$1
  start_server "server_$mode.log"
  for b in 1 8 64; do
    "$bin/colocated_bench" --target="unix:$socket" --metrics="$metrics" --batch=$b \
      --label="${mode}_b$b" | tee -a "$results"
  done
  # Each worker fills its sequences first; the timed parts start together.
  local workers=() start_at=$(($(date +%s) + 12))
  for w in 1 2 3 4; do
    "$bin/colocated_bench" --target="unix:$socket" --batch=8 --start_at=$start_at \
      --label="${mode}_four_workers_b8_w$w" \
      >"$out/worker_${mode}_$w.json" &
    workers+=($!)
  done
  for w in "${workers[@]}"; do wait "$w"; done
  cat "$out"/worker_"$mode"_*.json | tee -a "$results"
  rm -f "$out"/worker_"$mode"_*.json
  stop_server
}

runs plain
if [[ ${MPS:-0} == 1 ]]; then
  export CUDA_MPS_PIPE_DIRECTORY=$out/mps-pipe CUDA_MPS_LOG_DIRECTORY=$out/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    echo "MPS control daemon started"
    runs mps || echo "the runs under MPS failed"
    echo quit | nvidia-cuda-mps-control
  else
    echo "MPS did not start here: no runs under MPS"
  fi
fi
