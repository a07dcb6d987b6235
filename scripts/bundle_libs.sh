#!/usr/bin/env bash
# Copies binaries and every non-base shared library they load into
# OUT/bin and OUT/lib, for a machine that lacks the libraries (the GPU
# machine has no gRPC or Abseil). Run there with LD_LIBRARY_PATH=OUT/lib,
# or use binaries linked with the bundle RPATH.
set -euo pipefail
out=$1
shift
mkdir -p "$out/bin" "$out/lib"
# The commit the binaries were built from, for the results they produce.
git -C "$(dirname "$0")" describe --always --dirty >"$out/COMMIT" 2>/dev/null || echo unknown >"$out/COMMIT"
base='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|librt|libpthread|libresolv|libgcc_s|libstdc\+\+|libcuda|libcublas|libcublasLt)\.so'
for binary in "$@"; do
  cp -f "$binary" "$out/bin/"
  ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    [[ $soname =~ $base ]] && continue
    cp -fL "$path" "$out/lib/$soname"
  done
done
