#!/usr/bin/env bash
# Starts blocksel-server as a child process on a unix socket, runs the demo
# against it, then checks that SIGTERM stops the server with exit code 0.
# Arguments after the two binaries go to the server; DEMO_EXPECT, if set,
# is a line fragment the demo's output must hold.
set -euo pipefail
server=$1
demo=$2
shift 2
workdir=$(mktemp -d)
socket="unix:${workdir}/blocksel.sock"
"$server" --listen="$socket" --cache_mib=256 --log_level=warn --drain_propagation_seconds=0 \
  --metrics_address=127.0.0.1:0 "$@" &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$workdir"' EXIT

# The demo retries until the server answers (--wait_seconds).
"$demo" --server="$socket" --prompt_tokens=1500 --decode_steps=2 --wait_seconds=30 \
  | tee "${workdir}/demo.log"
grep -q "demo OK" "${workdir}/demo.log"
if [[ -n ${DEMO_EXPECT:-} ]]; then
  grep -qF -- "$DEMO_EXPECT" "${workdir}/demo.log"
fi

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
if [[ $status -ne 0 ]]; then
  echo "server exited with $status after SIGTERM" >&2
  exit 1
fi
echo "server_demo_e2e: demo matched the reference; SIGTERM gave exit 0"
