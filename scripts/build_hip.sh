#!/usr/bin/env bash
# Compiles and links the server with its kernels built as HIP (AMD) from the
# same source tree, so the HIP variant cannot rot. No AMD GPU exists on the
# build machines: this checks the build, it runs nothing on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_packages.sh hipcc libamdhip64-dev rocm-device-libs
cmake -S . -B build/hip -DCMAKE_BUILD_TYPE=Release -DBLOCKSEL_GPU=HIP \
  -DBLOCKSEL_BUILD_TESTS=OFF -DBLOCKSEL_BUILD_BENCH=OFF
cmake --build build/hip -j "$(nproc)" --target blocksel-server
echo "HIP build: blocksel-server linked with kernels for $(grep CMAKE_HIP_ARCHITECTURES:STRING build/hip/CMakeCache.txt | cut -d= -f2)"
