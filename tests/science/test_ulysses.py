"""Ulysses DistributedAttention on 2 gloo ranks vs attention over the whole sequence in one process.

float64 throughout: the all-to-all only moves values, and each rank's local attention sees exactly the
reference's inputs for its heads, so outputs and gradients agree to float64 rounding (1e-12).
"""

from __future__ import annotations

import pytest
import torch
from ulysses_runs import BATCH, DIM, SEQ, reference, sdpa_sbhd, ulysses

from deepshard.sequence import DistributedAttention, seq_all_to_all, split_sizes

TOL = 1e-12


@pytest.mark.parametrize(
    "heads,batch_first",
    [(4, False), (5, False), (1, False), (5, True)],  # even, uneven (3 + 2), fewer heads than ranks (1 + 0)
)
def test_two_ranks_equal_one_rank(heads, batch_first, dist2):
    want = reference(heads)
    results = dist2.run(ulysses, heads, batch_first)
    for r in results:
        block = r["block"]
        torch.testing.assert_close(r["out"], want[0][block], rtol=0, atol=TOL)
        for got, ref in zip(r["grads"], want[1:]):
            torch.testing.assert_close(got, ref[block], rtol=0, atol=TOL)
        # 4 all-to-alls of this rank's [S/P, b, h, d] block (heads padded to the largest share)
        padded_heads = 2 * max(split_sizes(heads, 2))
        assert r["forward_bytes"] == 4 * (SEQ // 2) * BATCH * padded_heads * DIM * 8
        assert r["all"] == 2 * r["forward_bytes"]  # backward: the same four, transposed


def test_one_rank_is_plain_attention_and_errors():
    q, k, v = (torch.randn(6, 1, 3, 4) for _ in range(3))
    torch.testing.assert_close(DistributedAttention(sdpa_sbhd, None)(q, k, v), sdpa_sbhd(q, k, v))
    with pytest.raises(ValueError, match="sp_stream"):
        DistributedAttention(sdpa_sbhd, None, sp_stream=object())
    with pytest.raises(ValueError, match="must differ"):
        seq_all_to_all(q, 2, -2)
    assert split_sizes(5, 2) == [3, 2] and split_sizes(1, 2) == [1, 0]
