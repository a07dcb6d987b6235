#!/usr/bin/env bash
# The README's two commands in the README's order: whatever an earlier
# configure cached in build/release (tests switched off, as scripts/run.sh
# once did), the test command configures every test, and a ctest run that
# finds no test fails instead of passing. Runs on a copy of the source tree.
set -euo pipefail
source_dir=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$source_dir" ls-files -z --cached --others --exclude-standard | (cd "$source_dir" && xargs -0 cp --parents -t "$work")
cd "$work"
cmake --preset release -DBLOCKSEL_BUILD_TESTS=OFF -DBLOCKSEL_BUILD_BENCH=OFF \
  -DBLOCKSEL_GPU=NONE >configure.log 2>&1 || { cat configure.log; exit 1; }
if ctest --preset release >ctest.log 2>&1; then
  cat ctest.log
  echo "test_command_test: ctest passed with no tests configured"
  exit 1
fi
scripts/test.sh --configure-only >configure.log 2>&1 || { cat configure.log; exit 1; }
count=$(ctest --preset release -N | sed -n 's/^Total Tests: //p')
if [[ -z $count || $count -eq 0 ]]; then
  echo "test_command_test: the test command configured no tests after a tests-off configure"
  exit 1
fi
echo "test_command_test: no tests is a failure, and the test command configured $count tests"
