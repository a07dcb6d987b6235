#!/usr/bin/env bash
# Installs the build into a temporary prefix, then configures, builds and
# runs tests/consumer against it with find_package(blocksel).
set -euo pipefail
build_dir=$1
source_dir=$2
cxx_flags=${3:-}  # the build's own (sanitizer builds need them to link)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
cmake --install "$build_dir" --prefix "$workdir/prefix" >/dev/null
cmake -S "$source_dir/tests/consumer" -B "$workdir/build" -DCMAKE_PREFIX_PATH="$workdir/prefix" \
  -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=$cxx_flags" >/dev/null
cmake --build "$workdir/build" -j 2 >/dev/null
"$workdir/build/consumer"
ls "$workdir/prefix/bin"
