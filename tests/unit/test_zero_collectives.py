"""The stateless pack / copy-out of ZeRO's rank-major buffers (deepshard.zero.collectives), one process."""

from __future__ import annotations

import torch

from deepshard.precision.master import as_rows
from deepshard.zero.collectives import copy_out, copy_out_rows, gather_whole, own_segment, rank_major_copies
from deepshard.zero.layout import BucketLayout

SHAPES = [torch.Size([5, 2]), torch.Size([3]), torch.Size([])]  # short and empty last shards, a 0-d member
WORLD = 3


def _rank_major(whole: list[torch.Tensor], layout: BucketLayout) -> torch.Tensor:
    """What an all-gather leaves: every rank's rows packed into its segment (padding NaN, never copied)."""
    buffer = torch.full((layout.full_numel,), float("nan"))
    for q in range(WORLD):
        seg = own_segment(layout, buffer, q)
        for i, (t, spec) in enumerate(zip(whole, layout.specs)):
            start, end = spec.row_range(q)
            layout.segment_view(seg, i, q).copy_(as_rows(t)[start:end].reshape(spec.local_shape(q)))
    return buffer


def test_copy_out_rebuilds_the_members_back_to_back() -> None:
    layout = BucketLayout(SHAPES, WORLD)
    whole = [torch.arange(s.numel(), dtype=torch.float32).reshape(s) + 10 * i for i, s in enumerate(SHAPES)]
    full = torch.empty(sum(s.numel() for s in SHAPES))
    copy_out(full, _rank_major(whole, layout), rank_major_copies(layout, [s.numel() for s in SHAPES]))
    assert torch.equal(full, torch.cat([t.reshape(-1) for t in whole]))


def test_copy_out_rows_fills_every_rank_but_the_skipped_one() -> None:
    layout = BucketLayout(SHAPES, WORLD)
    whole = [torch.randn(s) for s in SHAPES]
    params = [torch.zeros(s) for s in SHAPES]
    rows = [
        [as_rows(p)[slice(*spec.row_range(q))] for p, spec in zip(params, layout.specs)] for q in range(WORLD)
    ]
    copy_out_rows(layout, _rank_major(whole, layout), rows, skip=1)
    for p, t, spec in zip(params, whole, layout.specs):
        start, end = spec.row_range(1)
        expect = as_rows(t.clone())
        expect[start:end] = 0  # rank 1's own rows were left alone
        assert torch.equal(as_rows(p), expect)


def test_gather_whole_on_one_rank_is_a_copy() -> None:
    local = torch.randn(4, 3, dtype=torch.float64)
    out = gather_whole(local, torch.Size([4, 3]), world=1)
    assert (
        out.dtype == torch.float32 and torch.equal(out, local.float()) and out.data_ptr() != local.data_ptr()
    )
