#!/usr/bin/env bash
# Packs the build with CPack, unpacks the tarball into a temporary folder
# and runs the server, the demo and the CLI from it with an empty
# environment: no LD_LIBRARY_PATH, no PATH. Every bundled library must
# resolve inside the bundle through the programs' DT_RPATH.
set -euo pipefail
build_dir=$1
workdir=$(mktemp -d)
pid=
trap 'if [[ -n $pid ]]; then kill -9 "$pid" 2>/dev/null || true; fi; rm -rf "$workdir"' EXIT
cpack -G TGZ --config "$build_dir/CPackConfig.cmake" -B "$workdir/package" >/dev/null
tarball=$(ls "$workdir"/package/blocksel-*.tar.gz)
tar xzf "$tarball" -C "$workdir"
root=$(ls -d "$workdir"/blocksel-*/)
root=${root%/}

fail() {
  echo "bundle_e2e: $1" >&2
  shift
  for file in "$@"; do cat "$file" >&2; done
  exit 1
}

# Outputs go to files before grep reads them: a grep -q in a pipe may end
# early and kill a long writer with SIGPIPE, which pipefail turns into a
# silent failure (readelf's output here passes 8 KiB under ASan).
readelf -d "$root/bin/blocksel-server" >"$workdir/dynamic.txt"
grep -q 'RPATH.*\$ORIGIN/\.\./lib' "$workdir/dynamic.txt" ||
  fail "blocksel-server has no DT_RPATH \$ORIGIN/../lib" "$workdir/dynamic.txt"
# Libraries the host has too must still load from the bundle.
env -i ldd "$root/bin/blocksel-server" >"$workdir/ldd.txt"
for library in libgrpc++.so libgrpc.so libprotobuf.so libabsl_synchronization.so libspdlog.so \
  libprometheus-cpp-pull.so libcivetweb.so; do
  if ! grep "^[[:space:]]*${library}" "$workdir/ldd.txt" | grep -q "$root/bin/\.\./lib/"; then
    echo "$library does not load from the bundle:" >&2
    cat "$workdir/ldd.txt" >&2
    exit 1
  fi
done
if grep -q "not found" "$workdir/ldd.txt"; then
  cat "$workdir/ldd.txt" >&2
  exit 1
fi

socket="unix:$workdir/blocksel.sock"
env -i "$root/bin/blocksel-server" --backend=cpu --listen="$socket" --cache_mib=256 \
  --metrics_address= --drain_propagation_seconds=0 --log_level=warn >"$workdir/server.log" 2>&1 &
pid=$!
env -i "$root/bin/blocksel-demo" --server="$socket" --prompt_tokens=700 --decode_steps=1 \
  --wait_seconds=30 >"$workdir/demo.log" 2>&1 || true
grep -q "demo OK" "$workdir/demo.log" ||
  fail "the demo did not pass" "$workdir/demo.log" "$workdir/server.log"
health=$(env -i "$root/bin/blocksel-cli" --server="$socket" health 2>&1) || true
[[ $health == SERVING ]] || fail "health answered '$health'" "$workdir/server.log"
kill -TERM "$pid"
wait "$pid" || fail "the server exited with status $?" "$workdir/server.log"
echo "bundle_e2e: $(basename "$tarball") ($(du -h "$tarball" | cut -f1)), $(ls "$root/lib" | grep -c '\.so') libraries; server, demo and CLI ran from it with an empty environment"
