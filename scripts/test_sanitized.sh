#!/usr/bin/env bash
# Builds and runs the whole test suite under a sanitizer preset:
#   asan: AddressSanitizer with leak checks, and UndefinedBehaviorSanitizer;
#   tsan: ThreadSanitizer, against an Abseil built with it (see
#         scripts/build_tsan_abseil.sh), loaded in place of the system's.
# Any report fails the test. Host code only: the sanitizer presets build no
# GPU code; compute-sanitizer covers the kernels on the GPU machine.
#
#   scripts/test_sanitized.sh [PRESET]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-asan}
scripts/setup.sh
if [[ $preset == tsan ]]; then
  # clang-15's runtime symbolizes with llvm-15's llvm-symbolizer (the
  # preset names its path). Without it reports are unsymbolized, and the
  # suppressions, which match function names, match nothing.
  scripts/install_packages.sh llvm-15
  scripts/build_tsan_abseil.sh build/tsan-deps/abseil
fi
cmake --preset "$preset"
cmake --build "build/$preset" -j "$(nproc)"
ctest --preset "$preset"
