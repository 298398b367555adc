#!/usr/bin/env bash
# ZeRO stages 1 and 2: deepshard vs torch DDP vs DeepSpeed on the small (~23M) and medium (~124M) GPT,
# fp32 and bf16, 2 gloo ranks, contenders alternating within each round (see bench_dp.py).
# deepshard and DeepSpeed get the same ds_config: the stage, 5e6-element reduce/all-gather buckets,
# overlap_comm on. Usage: bash benchmarks/zero12_matrix.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/zero12_matrix}
mkdir -p "$out"
extra='{"zero_optimization": {"reduce_bucket_size": 5000000, "allgather_bucket_size": 5000000, "overlap_comm": true}}'
for preset in small medium; do
    if [ "$preset" = small ]; then steps="--rounds 3 --warmup 3 --steps 10"; else steps="--rounds 3 --warmup 2 --steps 5"; fi
    for stage in 1 2; do
        python benchmarks/bench_dp.py --preset "$preset" --stage "$stage" $steps --extra-config "$extra" \
            --out-dir "$out/${preset}_stage${stage}" 2>&1 | tee "$out/${preset}_stage${stage}.txt"
    done
done
