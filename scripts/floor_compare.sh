#!/usr/bin/env bash
# The fixed cost of a call, two servers against each other on one machine:
# blocksel-loadgen's floor run (B=1, one visible block) and a 1K-context
# run against each server in turn, a few rounds, the CPU backend, a unix
# socket. Prints p50 and the server's backend time per run; the JSON of
# each run goes to OUT_DIR.
#
#   scripts/floor_compare.sh SERVER_A SERVER_B LOADGEN OUT_DIR [ROUNDS]
set -euo pipefail
servers=("$1" "$2")
loadgen=$3
out=$4
rounds=${5:-3}
mkdir -p "$out"
socket=$(mktemp -u /tmp/blocksel-floor-XXXXXX.sock)
pid=
trap '[[ -n $pid ]] && kill -9 $pid 2>/dev/null; rm -f "$socket"' EXIT
for round in $(seq "$rounds"); do
  for which in 0 1; do
    for context in 64 1024; do
      name="server${which}_ctx${context}_round${round}"
      "${servers[$which]}" --listen="unix:$socket" --metrics_address=127.0.0.1:9478 --cache_mib=256 \
        --num_layers=4 --first_sparse_layer=3 --drain_propagation_seconds=0 --log_level=warn \
        --backend=cpu &
      pid=$!
      for _ in $(seq 50); do [[ -S $socket ]] && break; sleep 0.1; done
      "$loadgen" --server="unix:$socket" --metrics=127.0.0.1:9478 --batch=1 --context="$context" \
        --prefill_tokens=64 --concurrency=1 --duration_seconds=6 --warmup_seconds=1 \
        --oracle_every=1000 --json_out="$out/$name.json" >"$out/$name.txt"
      kill -TERM "$pid"
      wait "$pid"
      pid=
      echo "$name: $(sed -n 4p "$out/$name.txt") $(grep 'server backend' "$out/$name.txt")"
    done
  done
done
