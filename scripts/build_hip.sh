#!/usr/bin/env bash
# Compiles and links the server with its kernels built as HIP (AMD) from the
# same source tree, so the HIP variant cannot rot. No AMD GPU exists on the
# build machines: this checks the build, it runs nothing on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
hip_packages=(hipcc libamdhip64-dev rocm-device-libs)
missing=()
for package in "${hip_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}"
fi
cmake -S . -B build/hip -DCMAKE_BUILD_TYPE=Release -DBLOCKSEL_GPU=HIP \
  -DBLOCKSEL_BUILD_TESTS=OFF -DBLOCKSEL_BUILD_BENCH=OFF
cmake --build build/hip -j "$(nproc)" --target blocksel-server
echo "HIP build: blocksel-server linked with kernels for $(grep CMAKE_HIP_ARCHITECTURES:STRING build/hip/CMakeCache.txt | cut -d= -f2)"
