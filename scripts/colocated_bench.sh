#!/usr/bin/env bash
# The co-located GPU data plane, two processes on one GPU: blocksel-server
# on the cuda backend (one sparse layer, L=32K sequences) and
# colocated_bench as the worker. Each run checks the worker's selections
# against the gRPC path and times them on the worker's stream (post, wait,
# whole; the same in a worker graph; the gRPC round trip beside them):
#   b1, b8, b64         one worker at B=1, 8, 64
#   four_workers_b8     four workers at B=8 at once against one server
# Plain (time-sliced), and with MPS=1 the same again under the MPS control
# daemon (when it starts; the log says when it does not). JSON lines go to
# OUT_DIR/colocated.jsonl; the log gives the server's CPU seconds.
# With SANITIZE=TOOL (memcheck, say) it instead runs the server under
# compute-sanitizer with that tool for a few selections at B=8; a reported
# error fails the script (the reports are in the server log).
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

sanitizer=()
if [[ -n ${SANITIZE:-} ]]; then
  sanitizer=("${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" --tool "$SANITIZE"
    --error-exitcode 1)
fi

start_server() {  # log name
  "${sanitizer[@]}" "$bin/blocksel-server" --backend=cuda --listen="unix:$socket" \
    --metrics_address="$metrics" --num_layers=4 --first_sparse_layer=3 --cache_mib=4096 \
    --drain_propagation_seconds=0 >"$out/$1" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [[ -S $socket ]] && break; sleep 0.2; done
}

# Stops the server with SIGTERM (under the sanitizer, the server itself, so
# that the sanitizer writes its summary). Its exit status is not used: the
# runs' JSON and the sanitizer's summary say how they went.
stop_server() {
  if [[ ${#sanitizer[@]} -gt 0 ]]; then
    pkill -TERM -P "$pid" || kill -TERM "$pid"
  else
    kill -TERM "$pid"
  fi
  wait "$pid" || true
  pid=
}

# The server's CPU time so far (user + system, all threads), in seconds.
server_cpu_seconds() {
  awk -v tick="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / tick }' "/proc/$pid/stat"
}

runs() {  # mode label
  local mode=$1
  start_server "server_$mode.log"
  local cpu_before wall_before=$SECONDS
  cpu_before=$(server_cpu_seconds)
  for b in 1 8 64; do
    "$bin/colocated_bench" --target="unix:$socket" --metrics="$metrics" --batch=$b \
      --label="${mode}_b$b" | tee -a "$results"
  done
  echo "$mode: the server used $(server_cpu_seconds) - $cpu_before CPU seconds over" \
    "$((SECONDS - wall_before)) s of the one-worker runs"
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

if [[ ${#sanitizer[@]} -gt 0 ]]; then
  start_server server_sanitized.log
  "$bin/colocated_bench" --target="unix:$socket" --batch=8 --context=4096 --iterations=20 \
    --label=sanitized_b8 | tee -a "$results"
  # The summary decides: the sanitizer's own exit status is not the
  # server's when the server ends on a signal ("couldn't find exit code").
  stop_server
  if grep -q "ERROR SUMMARY: 0 errors" "$out/server_sanitized.log"; then
    echo "$SANITIZE: no errors in the server"
    exit 0
  fi
  echo "$SANITIZE: the server reported errors or no summary: see $out/server_sanitized.log"
  exit 1
fi

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
