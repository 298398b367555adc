"""Engine deviation vs the derived fp32 parity bound, per test case (docs/testing.md records the output).

For each case: the fp32 reference's deviation from the float64 run, the data-parallel-order
reference's, the bound they give (``deepshard.testing.parity.ParityBound``) and what the engine
actually shows. Run it natively and with ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2`` to see an AVX2-only CPU's rounding:

    python benchmarks/parity_bounds.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))

import engine_runs as er  # noqa: E402

from deepshard.testing import DistributedHarness  # noqa: E402
from deepshard.testing.parity import max_relative_difference, max_state_difference  # noqa: E402

Z2 = {"stage": 2, "reduce_bucket_size": 20000, "overlap_comm": True}
CASES = [
    ("stage 0, 2 ranks", 2, 1, {}, "tiny", False),
    ("stage 1, 2 ranks, odd sizes", 2, 1, {"zero_optimization": {**Z2, "stage": 1}}, "odd", False),
    ("stage 2, 2 ranks, odd sizes", 2, 1, {"zero_optimization": Z2}, "odd", False),
    ("stage 2, 2 ranks x 4 accumulation", 2, 4, {"zero_optimization": Z2}, "odd", False),
    ("stage 2, 4 ranks", 4, 1, {"zero_optimization": Z2}, "odd", False),
    ("stage 1, parameter groups", 2, 1, {"zero_optimization": {"stage": 1}}, "odd", True),
    ("stage 3, 2 ranks, odd sizes", 2, 1, {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}, "odd", False),
]


def main() -> None:
    torch.set_num_threads(2)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("| case | d(R,T) state | d(R',T) state | bound state | engine state | bound norms | engine norms | engine losses |")
    print("|---|---|---|---|---|---|---|---|")
    harnesses = {2: DistributedHarness(2, timeout_s=240), 4: DistributedHarness(4, timeout_s=240)}
    try:
        for name, world, gas, extra, preset, groups in CASES:
            got = harnesses[world].run(er.run_engine, world, gas, extra, False, False, preset, groups)[0]
            ref = er.reference(world, gas, preset=preset, groups=groups)
            assert ref.bound is not None
            b = ref.bound
            print(
                f"| {name} | {b.fp32.state:.2e} | {b.reordered.state:.2e} | {b.state:.2e} | "
                f"{max_state_difference(got['state'], ref.state):.2e} | {b.norms:.2e} | "
                f"{max_relative_difference(got['norms'], ref.grad_norms):.2e} | "
                f"{max_relative_difference(got['losses'], ref.losses):.2e} |"
            )
    finally:
        for h in harnesses.values():
            h.close()


if __name__ == "__main__":
    main()
