#!/usr/bin/env bash
# Fuzzes every target in tests/fuzz with libFuzzer (clang-15, with ASan and
# UBSan) for SECONDS each (default 60), starting from its checked-in corpus,
# and reports executions, corpus growth and findings. Findings (crash-*,
# leak-*, timeout-* inputs) are kept in build/fuzz/findings/<target>/.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
packages=()
command -v clang++-15 >/dev/null || packages+=(clang-15)
compgen -G "/usr/lib/llvm-15/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a" >/dev/null ||
  packages+=(libclang-common-15-dev)
scripts/install_packages.sh "${packages[@]}"
targets=(select_request_fuzzer snapshot_fuzzer decoder_fuzzer)
cmake -S . -B build/fuzz -DCMAKE_C_COMPILER=clang-15 -DCMAKE_CXX_COMPILER=clang++-15 \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBLOCKSEL_GPU=NONE -DBLOCKSEL_FUZZ=ON -DBLOCKSEL_WERROR=OFF \
  -DBLOCKSEL_BUILD_BENCH=OFF \
  "-DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer" >/dev/null
cmake --build build/fuzz -j "$(nproc)" --target "${targets[@]}" >/dev/null
status=0
printf '| target | seconds | executions | exec/s | corpus (seeds -> end) | findings |\n'
printf '|---|---|---|---|---|---|\n'
for target in "${targets[@]}"; do
  work=build/fuzz/work/$target
  findings=build/fuzz/findings/$target
  rm -rf "$work" && mkdir -p "$work" "$findings"
  seeds=$(ls tests/fuzz/corpus/$target | wc -l)
  log=build/fuzz/$target.log
  build/fuzz/tests/$target -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$findings/" "$work" "tests/fuzz/corpus/$target" >"$log" 2>&1 || status=1
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  found=$(ls "$findings" | wc -l)
  [[ $found -eq 0 ]] || status=1
  printf '| %s | %s | %s | %s | %s -> %s | %s |\n' "$target" "$seconds" "${executions:-?}" \
    "${rate:-?}" "$seeds" "$(ls "$work" | wc -l)" "$found"
done
exit $status
