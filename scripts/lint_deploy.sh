#!/usr/bin/env bash
# Checks the deployment files offline: the container images' Dockerfiles
# with dockerfilelint (from npm), the Kubernetes manifests and the Helm
# chart with scripts/check_manifests.py (PyYAML). Tools missing here are
# installed. No container engine or Helm runs on the build machines, so
# this is how they are checked.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_packages=()
command -v dockerfilelint >/dev/null || command -v npm >/dev/null || apt_packages+=(npm)
python3 -c "import yaml" 2>/dev/null || apt_packages+=(python3-yaml)
scripts/install_packages.sh "${apt_packages[@]}"
command -v dockerfilelint >/dev/null || npm install -g --silent dockerfilelint@1.8.0
status=0
for dockerfile in deploy/docker/Dockerfile.*; do
  if dockerfilelint "$dockerfile" >/tmp/dockerfilelint.out 2>&1; then
    echo "dockerfilelint: $dockerfile clean"
  else
    cat /tmp/dockerfilelint.out
    status=1
  fi
done
python3 scripts/check_manifests.py || status=1
exit $status
