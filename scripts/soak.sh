#!/usr/bin/env bash
# Soak: MINUTES of mixed open-loop load (decode and prefill) against a
# blocksel-server, in rounds of ROUND_SECONDS, sampling the server's RSS
# every second. Each round's load generator opens fresh sequences and
# releases them at its end. The server is in its steady state from the end
# of round 2: its allocator has seen the whole mix twice.
# Prints per round the requests, errors, p50/p99 and RSS, then the growth
# of RSS after round 2 and the drift of p99 from the first round to the
# last.
#
# Fails (exit 1) when any round has an error or a response that fails the
# load generator's checks, when the server dies, or when its RSS grows by
# more than BLOCKSEL_SOAK_MAX_RSS_GROWTH_MIB (default 32) after round 2.
# At least three rounds. The server runs on the CPU backend, or the one
# BLOCKSEL_SOAK_BACKEND names.
#
#   scripts/soak.sh SERVER LOADGEN [MINUTES] [RATE] [ROUND_SECONDS]
#   SERVER and LOADGEN: the blocksel-server and blocksel-loadgen binaries.
set -euo pipefail
server=$1
loadgen=$2
minutes=${3:-5}
rate=${4:-40}
round_seconds=${5:-30}
rounds=$((minutes * 60 / round_seconds))
if ((rounds < 3)); then
  echo "a soak needs at least three rounds of $round_seconds s" >&2
  exit 2
fi
max_growth_kib=$((${BLOCKSEL_SOAK_MAX_RSS_GROWTH_MIB:-32} * 1024))
work=$(mktemp -d)
socket="unix:$work/blocksel.sock"
"$server" --backend="${BLOCKSEL_SOAK_BACKEND:-cpu}" --listen="$socket" --metrics_address= \
  --num_layers=4 --first_sparse_layer=3 --cache_mib=512 \
  --drain_propagation_seconds=0 --log_level=warn &
pid=$!
sampler=
cleanup() {
  if [[ -n $sampler ]]; then kill "$sampler" 2>/dev/null || true; fi
  kill -9 "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [[ -S $work/blocksel.sock ]] && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0; }
(while kill -0 "$pid" 2>/dev/null; do echo "$(rss)" >>"$work/rss.txt"; sleep 1; done) &
sampler=$!

failed=0
printf '| round | batches | errors | p50 | p99 | server RSS |\n|---|---|---|---|---|---|\n'
for round in $(seq "$rounds"); do
  if ! "$loadgen" --server="$socket" --mode=open --rate="$rate" --concurrency=4 \
    --batch=4 --context=8192 --decode_fraction=0.9 --prefill_tokens=256 \
    --duration_seconds=$((round_seconds - 2)) --warmup_seconds=1 --oracle_every=200 \
    --seed="$round" --json_out="$work/round.json" >"$work/round.txt"; then
    echo "round $round failed:" && cat "$work/round.txt"
    failed=1
  fi
  json=$(cat "$work/round.json" 2>/dev/null || echo '{}')
  field() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" <<<"$json"; }
  p99=$(field p99)
  printf '| %d | %s | %s | %s us | %s us | %s KiB |\n' "$round" "$(field batches)" \
    "$(field errors)" "$(field p50)" "$p99" "$(rss)"
  if [[ $round -eq 1 ]]; then first_p99=$p99; fi
  if [[ $round -eq 2 ]]; then
    settled_samples=$(wc -l <"$work/rss.txt")
    settled_rss=$(rss)
  fi
  last_p99=$p99
done
kill "$sampler" 2>/dev/null || true
sampler=
if ! kill -0 "$pid" 2>/dev/null; then
  echo "the server died during the soak"
  exit 1
fi
max_rss=$(tail -n +"$((settled_samples + 1))" "$work/rss.txt" | sort -n | tail -n 1)
max_rss=${max_rss:-$settled_rss}
growth=$((max_rss - settled_rss))
echo "RSS: $(head -n 1 "$work/rss.txt") KiB at start, ${settled_rss} KiB after round 2," \
  "max ${max_rss} KiB after it (growth ${growth} KiB, limit ${max_growth_kib} KiB);" \
  "p99: first round ${first_p99} us, last round ${last_p99} us"
if ((growth > max_growth_kib)); then
  echo "RSS grew by ${growth} KiB after round 2"
  failed=1
fi
kill -TERM "$pid"
wait "$pid"
exit "$failed"
