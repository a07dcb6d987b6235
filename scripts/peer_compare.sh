#!/usr/bin/env bash
# Our kernels and the peer (vLLM's Triton indexer) in one call on one card:
# gpu_selection_bench, then the peer's benchmark, then one table joining
# them (bench/compare_with_peer.py). Four files go to OUT_DIR:
# blocksel.json, vllm_peer.json, kernels_vs_peer.json and .md; both
# benchmarks print to standard output.
#
#   scripts/peer_compare.sh BUNDLE PEER_DIR VLLM_FILE OUT_DIR
#
# PEER_DIR holds bench_vllm_peer.py and vllm_stub_pkg/ (../shared/peer);
# VLLM_FILE is vLLM's index_topk.py, kept out of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=$(cd "$1" && pwd)
peer_dir=$2
vllm_file=$(realpath "$3")
out=$4
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LD_LIBRARY_PATH=$bundle/lib:${CUDA_HOME:-/usr/local/cuda}/lib64:${LD_LIBRARY_PATH:-}
"$bundle/bin/gpu_selection_bench" --json_out="$out/blocksel.json"
python3 "$peer_dir/bench_vllm_peer.py" --vllm_file "$vllm_file" --out "$out"
python3 bench/compare_with_peer.py --ours "$out/blocksel.json" --peer "$out/vllm_peer.json" \
  --commit "$(cat "$bundle/COMMIT")" --date "$(date -u +%Y-%m-%d)" \
  --out_json "$out/kernels_vs_peer.json" --out_md "$out/kernels_vs_peer.md"
