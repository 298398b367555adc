"""The serve tests run tiny matrices (hidden 64): one intra-op thread, because OpenMP's barrier between two
threads costs more than the work on a loaded 2-core machine (measured 40 ms vs 1 ms per linear). Restored after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
