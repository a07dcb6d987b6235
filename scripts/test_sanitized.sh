#!/usr/bin/env bash
# Builds and runs the whole test suite under a sanitizer preset: asan
# (AddressSanitizer with leak checks, and UndefinedBehaviorSanitizer, any
# report fails the test). Host code only: the sanitizer presets build no
# GPU code; compute-sanitizer covers the kernels on the GPU machine.
#
#   scripts/test_sanitized.sh [PRESET]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-asan}
scripts/setup.sh
cmake --preset "$preset"
cmake --build "build/$preset" -j "$(nproc)"
ctest --test-dir "build/$preset" -j "$(nproc)" --output-on-failure
