#!/usr/bin/env bash
# The test command: installs missing packages, builds everything (Release),
# runs every test under ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release
cmake --build --preset release -j "$(nproc)"
ctest --preset release
