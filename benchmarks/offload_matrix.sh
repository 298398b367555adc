#!/usr/bin/env bash
# ZeRO-Offload / ZeRO-Infinity: deepshard vs DeepSpeed on the medium (~124M) GPT, 2 gloo ranks, the two
# contenders alternating within each round (see bench_dp.py, whose docstring explains every offload
# setting). deepshard and DeepSpeed get the same ds_config (check with --dry-run):
#   stage2_cpu:  stage 2, offload_optimizer {"device": "cpu"}, fp32 and bf16, with the 5e6-element
#                reduce/all-gather buckets and overlap_comm of the stage 1/2 matrix (zero12_matrix.sh);
#   stage3_nvme: stage 3, offload_param and offload_optimizer on NVMe (pipeline_read/write, buffer_count 5,
#                buffer_size 4e7, max_in_cpu 0, stage3_max_reuse_distance 0, the aio section), bf16, with
#                the 5e6 reduce bucket and overlap_comm of the stage 3 matrix (zero3_matrix.sh). Each job
#                swaps to a fresh directory under NVME_DIR (a real disk, not tmpfs), deleted afterwards.
# DeepSpeed's NVMe offload needs libaio (apt-get install libaio-dev) for its async_io op.
# Writes benchmarks/results/offload_medium_{stage2_cpu,stage3_nvme}.json; logs go to OUT_DIR.
# Usage: bash benchmarks/offload_matrix.sh [OUT_DIR] [NVME_DIR]
#        (ROUNDS, WARMUP, STEPS override 3 rounds of 2 warm-up + 5 timed steps; CONFIGS picks configurations)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/offload_matrix}
nvme=${2:-/tmp/bench_dp_nvme}
steps="--rounds ${ROUNDS:-3} --warmup ${WARMUP:-2} --steps ${STEPS:-5}"
mkdir -p "$out" benchmarks/results
for config in ${CONFIGS:-stage2_cpu stage3_nvme}; do
    case "$config" in
        stage2_cpu)
            flags="--stage 2 --offload-optimizer cpu --dtypes fp32,bf16"
            extra='{"zero_optimization": {"reduce_bucket_size": 5000000, "allgather_bucket_size": 5000000, "overlap_comm": true}}'
            ;;
        stage3_nvme)
            flags="--stage 3 --offload-optimizer nvme --offload-param nvme --dtypes bf16"
            extra='{"zero_optimization": {"reduce_bucket_size": 5000000, "overlap_comm": true}}'
            ;;
        *)
            echo "unknown configuration $config (stage2_cpu, stage3_nvme)" >&2
            exit 2
            ;;
    esac
    # shellcheck disable=SC2086  # $flags and $steps are lists of arguments
    python benchmarks/bench_dp.py --preset medium --impls deepshard,deepspeed $flags $steps \
        --extra-config "$extra" --nvme-dir "$nvme" --out-dir "$out/medium_$config" 2>&1 | tee "$out/medium_$config.txt"
    cp "$out/medium_$config/results.json" "benchmarks/results/offload_medium_$config.json"
done
