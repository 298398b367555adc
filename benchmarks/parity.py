"""Print how closely distributed runs match the single-process PyTorch reference.

    python benchmarks/parity.py            # stages 0-2, fp32 and bf16, world 2 and 4, 20 steps

Each row: max relative difference of the 20 per-step losses, and the largest per-tensor relative
difference (L2) of the final parameters, against the reference of tests/distributed/engine_runs.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "dist"))

from engine_runs import reference, run_engine  # noqa: E402

from deepshard.testing import DistributedHarness  # noqa: E402
from deepshard.testing.parity import max_relative_difference, max_state_difference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--stages", default="0,1,2")
    args = parser.parse_args()
    print(f"{'world':>5} {'stage':>5} {'dtype':>5} {'gas':>3} {'loss max rel diff':>18} {'param max rel diff':>19}")
    for world in (int(w) for w in args.worlds.split(",")):
        with DistributedHarness(world) as harness:
            for stage in (int(s) for s in args.stages.split(",")):
                for dtype in ("fp32", "bf16"):
                    for gas in (1, 4):
                        extra = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}}
                        result = harness.run(run_engine, world, gas, extra, False, False, "odd")[0]
                        ref = reference(world, gas, preset="odd")
                        loss = max_relative_difference(result["losses"], ref.losses)
                        param = max_state_difference(result["state"], ref.state)
                        print(f"{world:>5} {stage:>5} {dtype:>5} {gas:>3} {loss:>18.2e} {param:>19.2e}", flush=True)


if __name__ == "__main__":
    main()
