"""Cost of the comms-logger hook in deepshard.comm when the logger is off.

Calls ``deepshard.comm.all_reduce`` in one process without a process group (the collective is an
identity, so only Python-level overhead is measured) with the hook and through ``__wrapped__`` (the
function without it), and prints the difference per call.

    python benchmarks/comm_observer_overhead.py
"""

from __future__ import annotations

import timeit

import torch

from deepshard import comm


def main() -> None:
    x = torch.ones(1)
    n = 200_000
    hooked = min(timeit.repeat(lambda: comm.all_reduce(x), number=n, repeat=5)) / n
    bare = min(timeit.repeat(lambda: comm.all_reduce.__wrapped__(x), number=n, repeat=5)) / n  # type: ignore[attr-defined]
    print(f"all_reduce without a process group: {bare * 1e9:.0f} ns bare, {hooked * 1e9:.0f} ns with the hook "
          f"(+{(hooked - bare) * 1e9:.0f} ns per collective)")  # fmt: skip


if __name__ == "__main__":
    main()
