#!/usr/bin/env bash
# The test command: installs missing packages, builds everything (Release),
# runs every test under ctest.
#
#   scripts/test.sh [--configure-only]
#
# Tests and benchmarks are switched on explicitly, whatever an earlier
# configure of build/release cached, and the preset fails a run that finds
# no test. --configure-only stops after configuring (the suite's own check
# of this script uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release -DBLOCKSEL_BUILD_TESTS=ON -DBLOCKSEL_BUILD_BENCH=ON
if [[ ${1:-} == --configure-only ]]; then exit 0; fi
cmake --build --preset release -j "$(nproc)"
ctest --preset release
