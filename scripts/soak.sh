#!/usr/bin/env bash
# Soak: MINUTES of mixed open-loop load (decode and prefill) against a
# blocksel-server, in rounds of 30 s, sampling the server's RSS every 5 s.
# Prints per round the requests, errors, p50/p99 and RSS, then the growth
# of RSS and the drift of p99 from the first round to the last.
#
#   scripts/soak.sh BIN_DIR [MINUTES] [RATE]
#   BIN_DIR holds blocksel-server and blocksel-loadgen.
set -euo pipefail
bin=$1
minutes=${2:-5}
rate=${3:-40}
work=$(mktemp -d)
port=${BLOCKSEL_SOAK_PORT:-50251}
# Short leases: each round opens fresh sequences and leaves them to expire.
"$bin/blocksel-server" --backend=cpu --listen="127.0.0.1:$port" --metrics_address= \
  --num_layers=4 --first_sparse_layer=3 --cache_mib=512 --default_lease_seconds=20 \
  --drain_propagation_seconds=0 --log_level=warn &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
(while kill -0 "$pid" 2>/dev/null; do echo "$(date +%s) $(rss)" >>"$work/rss.txt"; sleep 5; done) &
sampler=$!

rounds=$((minutes * 2))
printf '| round | batches | errors | p50 | p99 | server RSS |\n|---|---|---|---|---|---|\n'
for round in $(seq "$rounds"); do
  "$bin/blocksel-loadgen" --server="127.0.0.1:$port" --mode=open --rate="$rate" --concurrency=4 \
    --batch=4 --context=8192 --decode_fraction=0.9 --prefill_tokens=256 --duration_seconds=28 \
    --warmup_seconds=1 --oracle_every=200 --seed="$round" --json_out="$work/round.json" \
    >/dev/null || true
  json=$(cat "$work/round.json")
  field() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" <<<"$json"; }
  batches=$(sed -n 's/.*"batches": \([0-9]*\).*/\1/p' <<<"$json")
  p50=$(sed -n 's/.*"p50": \([0-9.]*\).*/\1/p' <<<"$json")
  p99=$(sed -n 's/.*"p99": \([0-9.]*\).*/\1/p' <<<"$json")
  printf '| %d | %s | %s | %s us | %s us | %s KiB |\n' "$round" "$batches" "$(field errors)" \
    "$p50" "$p99" "$(rss)"
  [[ $round -eq 1 ]] && first_p99=$p99
  last_p99=$p99
done
kill "$sampler" 2>/dev/null || true
first_rss=$(head -n 1 "$work/rss.txt" | cut -d' ' -f2)
last_rss=$(tail -n 1 "$work/rss.txt" | cut -d' ' -f2)
max_rss=$(cut -d' ' -f2 "$work/rss.txt" | sort -n | tail -n 1)
echo "RSS: first sample ${first_rss} KiB, last ${last_rss} KiB, max ${max_rss} KiB;" \
  "p99: first round ${first_p99} us, last round ${last_p99} us"
kill -TERM "$pid"
wait "$pid"
