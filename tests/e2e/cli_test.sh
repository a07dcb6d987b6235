#!/usr/bin/env bash
# blocksel-cli against a real server: health, info, a sequence's life, an
# append from a raw file, a select from a text-format request, snapshot.
set -euo pipefail
server=$1
cli=$2
workdir=$(mktemp -d)
socket="unix:${workdir}/blocksel.sock"
"$server" --listen="$socket" --num_layers=2 --first_sparse_layer=1 --num_heads=2 --head_dim=16 \
  --topk=4 --cache_mib=16 --log_level=warn --metrics_address= --drain_propagation_seconds=0 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$workdir"' EXIT
cli() { "$cli" --server="$socket" "$@"; }
for _ in $(seq 100); do cli health >/dev/null 2>&1 && break; sleep 0.1; done

[[ $(cli health) == SERVING ]]
[[ $(cli health --service=) == SERVING ]]
# grep reads the whole output: a grep -q in a pipe could end it early and
# fail the writer with SIGPIPE under pipefail.
grep -q "head_dim: 16" <<<"$(cli info)"
grep -q '"topk": 4' <<<"$(cli info --json)"
[[ $(cli open --id=42) == 42 ]]
if cli open --id=42 2>"${workdir}/err"; then
  echo "opening 42 twice succeeded" >&2
  exit 1
fi
grep -q ALREADY_EXISTS "${workdir}/err"

# 300 tokens x D=16 bf16 keys: 9600 bytes; ones, so every score is the
# query's sum.
printf '\x80\x3f%.0s' $(seq 4800) >"${workdir}/keys.bin"
grep -q "appended 300 keys" <<<"$(cli append --id=42 --layer=1 --keys_file="${workdir}/keys.bin")"
printf '\x80\x3f%.0s' $(seq 32) >"${workdir}/queries.bin"
cat >"${workdir}/request.txtpb" <<'PROTO'
request_id: 9
layer: 1
decode { requests { sequence_id: 42 seq_len: 300 } }
PROTO
cli select --request="${workdir}/request.txtpb" --queries_file="${workdir}/queries.bin" \
  >"${workdir}/select.txt"
cat "${workdir}/select.txt"
# Position 299 sees blocks 0..2; the local block (2) first, then the
# others, all tied, by id.
grep -q "head 0 row 0: 2 0 1 -1" "${workdir}/select.txt"
grep -q "head 1 row 0: 2 0 1 -1" "${workdir}/select.txt"
if cli select --request="${workdir}/keys.bin" 2>"${workdir}/err"; then
  echo "a binary file parsed as a request" >&2
  exit 1
fi
cli renew --ids=42
[[ $(cli release --id=42) == released ]]
[[ $(cli release --id=42) == "was not open" ]]
if cli snapshot 2>"${workdir}/err"; then
  echo "snapshot without --snapshot_path succeeded" >&2
  exit 1
fi
grep -q FAILED_PRECONDITION "${workdir}/err"
kill -TERM "$pid"
wait "$pid"
echo "cli_e2e: every command answered as expected"
