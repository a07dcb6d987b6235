#!/usr/bin/env bash
# The run command: installs missing packages, builds the server and the demo,
# starts blocksel-server on the default backend (the CPU when there is no
# GPU), runs the demo client against it, and keeps serving until Ctrl-C.
#   BLOCKSEL_ADDRESS   listen address (default 127.0.0.1:50051)
#   BLOCKSEL_EXIT_AFTER_DEMO=1  stop the server once the demo has run
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The test command's configuration, two targets of it: nothing cached here
# keeps scripts/test.sh from building and running every test afterwards.
cmake --preset release
cmake --build --preset release -j "$(nproc)" --target blocksel-server blocksel-demo

address=${BLOCKSEL_ADDRESS:-127.0.0.1:50051}
# No load balancer to tell: no drain propagation wait on exit.
build/release/server/blocksel-server --listen="$address" --cache_mib=1024 \
  --drain_propagation_seconds=0 &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null || true; wait $server_pid 2>/dev/null || true' EXIT

# The demo waits for the server to come up (--wait_seconds).
build/release/client/blocksel-demo --server="$address" --wait_seconds=30

if [[ "${BLOCKSEL_EXIT_AFTER_DEMO:-0}" == 1 ]]; then exit 0; fi
echo "blocksel-server is serving on $address (Ctrl-C to stop)"
wait "$server_pid"
