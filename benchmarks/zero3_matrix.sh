#!/usr/bin/env bash
# ZeRO stage 3: deepshard vs PyTorch FSDP2 (fully_shard per block + root) vs DeepSpeed ZeRO-3 on the
# small (~23M) and medium (~124M) GPT, fp32 and bf16, 2 gloo ranks, contenders alternating within each
# round (see bench_dp.py). deepshard and DeepSpeed get the same ds_config: stage 3, the 5e6-element
# reduce bucket and overlap_comm of the stage 1/2 matrix (allgather_bucket_size is a stage 1/2 setting;
# stage3_* keys stay at DeepSpeed's defaults). FSDP2 reads no ds_config.
# Writes benchmarks/results/zero3_{small,medium}_stage3.json; logs go to OUT_DIR.
# Usage: bash benchmarks/zero3_matrix.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/zero3_matrix}
mkdir -p "$out" benchmarks/results
extra='{"zero_optimization": {"reduce_bucket_size": 5000000, "overlap_comm": true}}'
for preset in small medium; do
    if [ "$preset" = small ]; then steps="--rounds 3 --warmup 3 --steps 10"; else steps="--rounds 3 --warmup 2 --steps 5"; fi
    python benchmarks/bench_dp.py --preset "$preset" --stage 3 $steps --extra-config "$extra" \
        --out-dir "$out/${preset}_stage3" 2>&1 | tee "$out/${preset}_stage3.txt"
    cp "$out/${preset}_stage3/results.json" "benchmarks/results/zero3_${preset}_stage3.json"
done
