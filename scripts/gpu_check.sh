#!/usr/bin/env bash
# Runs the GPU tests, the sanitizers, the GPU benchmarks and a SASS summary
# on a GPU machine from a bundle made by scripts/bundle_libs.sh (see
# DEVELOPERS.md). Logs go to LOG_DIR (default: ./gpu-logs), one per step.
#
#   scripts/gpu_check.sh BUNDLE [steps...]
#   steps: tests service sanitizers bench batching sass completion transport
#          e2e peer colocated (default: the first six)
#   service: the fault and drain tests and a 2-minute soak, on the GPU
#   backend. bench: every shape, or those matching BENCH_FILTER.
#   completion: how fast the host notices finished GPU work, and copy costs.
#   transport: gRPC round trips alone, callback and completion-queue APIs.
#   e2e: scripts/e2e_bench.sh on the GPU backend (JSON in $LOG_DIR/e2e).
#   colocated: scripts/colocated_bench.sh (a worker process beside the
#   server on one GPU; JSON lines in $LOG_DIR/colocated), the kernel alone
#   at its shapes, and the server under compute-sanitizer's memcheck.
#   peer: scripts/peer_compare.sh, our kernels beside vLLM's in this call
#   (PEER_DIR, default .peer: the peer benchmark; VLLM_FILE, default
#   $PEER_DIR/index_topk.py); the table and JSON in $LOG_DIR/peer.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=$(cd "$1" && pwd)
shift
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(tests service sanitizers bench batching sass)
logs=${LOG_DIR:-$PWD/gpu-logs}
mkdir -p "$logs"
cuda=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH=$bundle/lib:$cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSEL_GOLDEN_DIR=$PWD/tests/testdata/golden
export BLOCKSEL_SERVER_BINARY=$bundle/bin/blocksel-server
export BLOCKSEL_TEST_BACKEND=cuda
export BLOCKSEL_SOAK_BACKEND=cuda
status=0

step() {  # name, command...
  local name=$1
  shift
  if [[ ! -x $1 ]]; then
    echo "-- $name: $1 is not in the bundle, skipped"
    return
  fi
  echo "== $name: $*" | tee "$logs/$name.log"
  if ! "$@" >>"$logs/$name.log" 2>&1; then
    echo "!! $name failed" | tee -a "$logs/$name.log"
    status=1
  fi
  tail -n 3 "$logs/$name.log"
}

# Kernel subsets the sanitizers run: every GPU path on every shared edge
# case, and the GPU tests' own cases without the long random sweeps.
# racecheck takes the decode cases and the golden ones (the whole subset
# runs for minutes under it).
edge_cases='*/gpu_*'
sanitized='*LongPrefill*:*GoldenCase*:*BlockScores*:*DecodeWithATooSmall*'
raced='*DecodeWithATooSmall*:*ReproducesEveryGoldenCase*:*DecodeLaunchesShareOneWorkspace*'

for s in "${steps[@]}"; do
  case $s in
    tests)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$logs/device.txt"
      step gpu_selector_test "$bundle/bin/gpu_selector_test"
      step backend_edge_cases_test "$bundle/bin/backend_edge_cases_test"
      step gpu_engine_test "$bundle/bin/gpu_engine_test"
      step golden_test "$bundle/bin/golden_test"
      step snapshot_test "$bundle/bin/snapshot_test"
      step gpu_session_test "$bundle/bin/gpu_session_test"
      ;;
    colocated)
      # Two processes on one GPU, plain and under MPS, and the kernel alone
      # at the same shapes in the same call.
      MPS=1 step colocated_bench scripts/colocated_bench.sh "$bundle/bin" "$logs/colocated"
      step colocated_kernels "$bundle/bin/gpu_selection_bench" "L=32K Q=1"
      # The server's side (hub, copy runs, delivery) under memcheck.
      SANITIZE=memcheck step colocated_memcheck scripts/colocated_bench.sh "$bundle/bin" \
        "$logs/colocated_memcheck"
      ;;
    service)
      step fault_test "$bundle/bin/fault_test"
      step drain_test "$bundle/bin/drain_test"
      step soak scripts/soak.sh "$bundle/bin/blocksel-server" "$bundle/bin/blocksel-loadgen" 2 40
      ;;
    sanitizers)
      step memcheck_edge_cases "$cuda/bin/compute-sanitizer" --tool memcheck --error-exitcode 1 \
        "$bundle/bin/backend_edge_cases_test" --gtest_filter="$edge_cases"
      step memcheck "$cuda/bin/compute-sanitizer" --tool memcheck --error-exitcode 1 \
        "$bundle/bin/gpu_selector_test" --gtest_filter="$sanitized"
      # Reads of device memory nothing wrote (a merge reading a list no
      # CTA produced shows here first).
      step initcheck_edge_cases "$cuda/bin/compute-sanitizer" --tool initcheck --error-exitcode 1 \
        "$bundle/bin/backend_edge_cases_test" --gtest_filter="$edge_cases"
      step initcheck "$cuda/bin/compute-sanitizer" --tool initcheck --error-exitcode 1 \
        "$bundle/bin/gpu_selector_test" --gtest_filter="$sanitized"
      step racecheck "$cuda/bin/compute-sanitizer" --tool racecheck --error-exitcode 1 \
        "$bundle/bin/gpu_selector_test" --gtest_filter="$raced"
      # The GPU backend's uploads, copy runs, graphs and resident tables.
      step memcheck_engine "$cuda/bin/compute-sanitizer" --tool memcheck --error-exitcode 1 \
        "$bundle/bin/gpu_engine_test"
      step memcheck_golden "$cuda/bin/compute-sanitizer" --tool memcheck --error-exitcode 1 \
        "$bundle/bin/golden_test"
      ;;
    bench)
      step gpu_selection_bench "$bundle/bin/gpu_selection_bench" ${BENCH_FILTER:+"$BENCH_FILTER"}
      ;;
    completion)
      step completion_bench "$bundle/bin/completion_bench"
      ;;
    transport)
      step transport_bench "$bundle/bin/transport_bench" --json_out="$logs/transport.json"
      ;;
    e2e)
      step e2e_bench scripts/e2e_bench.sh "$bundle/bin" "$logs/e2e" cuda
      ;;
    peer)
      peer_dir=${PEER_DIR:-.peer}
      step peer_compare scripts/peer_compare.sh "$bundle" "$peer_dir" \
        "${VLLM_FILE:-$peer_dir/index_topk.py}" "$logs/peer"
      ;;
    batching)
      step batching_bench "$bundle/bin/batching_bench" --backend=cuda --streams=16 \
        --context=32768 --window_us=0,20,50,100 --seconds=3
      ;;
    sass)
      # Matrix instructions and dependent-launch controls in the kernels.
      "$cuda/bin/cuobjdump" -sass "$bundle/bin/gpu_selection_bench" >"$logs/sass.txt" 2>&1
      {
        echo "instructions of interest over all kernels and architectures:"
        grep -oE "HMMA\.[0-9A-Z.]+|LDSM\.[0-9A-Z.]+|ACQBULK|PREEXIT|LDGSTS\.[0-9A-Z.]+" "$logs/sass.txt" |
          sort | uniq -c
        echo "kernels with matrix instructions (HMMA count):"
        awk '/Function :/ {f=$3} /HMMA/ {h[f]++} END {for (k in h) print h[k], k}' "$logs/sass.txt"
      } >"$logs/sass_summary.txt"
      tail -n 20 "$logs/sass_summary.txt"
      rm -f "$logs/sass.txt"
      ;;
    *)
      echo "unknown step $s" >&2
      status=2
      ;;
  esac
done
exit $status
