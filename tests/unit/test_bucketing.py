"""Bucket planning and flat buffers (``deepshard.comm.bucketing``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshard.comm.bucketing import FlatBuffer, broadcast_coalesced, plan_buckets


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=50), max_size=30), limit=st.integers(1, 60))
def test_plan_buckets_properties(sizes, limit):
    buckets = plan_buckets(sizes, limit)
    flat = [i for b in buckets for i in b]
    assert flat == list(range(len(sizes)))  # every index once, order kept
    assert all(b for b in buckets)  # no empty bucket
    for bucket in buckets:
        total = sum(sizes[i] for i in bucket)
        assert total <= limit or len(bucket) == 1, (bucket, total)  # only an oversized single may exceed
    # greedy: a bucket is closed only when the next tensor would not fit
    for current, following in zip(buckets, buckets[1:]):
        assert sum(sizes[i] for i in current) + sizes[following[0]] > limit


def test_plan_buckets_examples():
    assert plan_buckets([], 10) == []
    assert plan_buckets([4, 4, 4], 8) == [[0, 1], [2]]
    assert plan_buckets([5, 20, 3], 10) == [[0], [1], [2]]  # oversized tensor alone
    assert plan_buckets([20, 3, 3], 10) == [[0], [1, 2]]
    assert plan_buckets([10, 10], 10) == [[0], [1]]  # exactly full
    assert plan_buckets([0, 0, 10, 0], 10) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("bad", [0, -5])
def test_plan_buckets_invalid_size(bad):
    with pytest.raises(ValueError, match=f"positive number of elements, got {bad}"):
        plan_buckets([1, 2], bad)


def test_flat_buffer_views_alias_the_flat_tensor():
    shapes = [torch.Size([2, 3]), torch.Size([4]), torch.Size([]), torch.Size([0, 5]), torch.Size([1, 1, 2])]
    buf = FlatBuffer(shapes, torch.float32, torch.device("cpu"))
    assert buf.numel == 6 + 4 + 1 + 0 + 2 == buf.flat.numel()
    assert buf.offsets == [0, 6, 10, 11, 11]
    assert buf.nbytes == 13 * 4
    assert [v.shape for v in buf.views] == shapes
    assert torch.count_nonzero(buf.flat) == 0
    # writing through a view changes the flat tensor, and the other way round
    buf.views[0].fill_(1.0)
    buf.views[1].copy_(torch.arange(4.0))
    buf.views[2].fill_(7.0)
    buf.views[4].fill_(-1.0)
    expected = torch.tensor([1.0] * 6 + [0.0, 1.0, 2.0, 3.0] + [7.0] + [-1.0, -1.0])
    assert torch.equal(buf.flat, expected)
    buf.flat.mul_(2)
    assert torch.equal(buf.views[1], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    buf.flat.zero_()
    assert all(torch.count_nonzero(v) == 0 for v in buf.views)
    for view, offset in zip(buf.views, buf.offsets):
        if view.numel():
            assert view.data_ptr() == buf.flat.data_ptr() + offset * buf.flat.element_size()


def test_flat_buffer_dtype():
    buf = FlatBuffer([torch.Size([3])], torch.bfloat16, torch.device("cpu"))
    assert buf.flat.dtype == torch.bfloat16 and buf.views[0].dtype == torch.bfloat16
    assert buf.nbytes == 6


def test_broadcast_coalesced_without_process_group_is_a_no_op():
    t = torch.arange(3.0)
    broadcast_coalesced([t], src=0)
    assert torch.equal(t, torch.arange(3.0))
