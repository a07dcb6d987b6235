#!/usr/bin/env bash
# Installs the Debian 12 packages blocksel builds against. Installs only what
# is missing; does nothing when everything is present.
set -euo pipefail

packages=(
  cmake g++ make pkg-config ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev nlohmann-json3-dev grpc-proto zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev prometheus-cpp-dev
  prometheus curl  # promtool and curl: the metrics scrape test
)

"$(dirname "$0")/install_packages.sh" "${packages[@]}"
