#!/usr/bin/env bash
# The ThreadSanitizer setup itself: the planted race must be reported (a
# non-zero exit) and its stacks must name the planted functions and their
# source file. Runs under the tsan preset's TSAN_OPTIONS.
set -uo pipefail
binary=$1
output=$("$binary" 2>&1)
status=$?
fail() {
  echo "tsan_setup_test: $1"
  echo "$output"
  exit 1
}
[[ $status -ne 0 ]] || fail "the planted race was not reported (exit 0)"
grep -q "WARNING: ThreadSanitizer: data race" <<<"$output" || fail "no data race report"
grep -q "PlantedRaceWriterOne" <<<"$output" || fail "the report is not symbolized"
grep -q "planted_race.cc:" <<<"$output" || fail "the report has no source lines"
if grep -q "external symbolizer" <<<"$output"; then fail "the symbolizer failed"; fi
echo "tsan_setup_test: the planted race is reported with symbolized stacks"
