"""The derived fp32 parity bound is measured from the reference and still rejects real errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))

import engine_runs as er  # noqa: E402

from deepshard.testing.parity import (  # noqa: E402
    KAPPA,
    data_parallel_order,
    max_state_difference,
    reference_train,
)


def _train(batches, lr=er.LR, weight_decay=0.01):
    model = er.build_model(False, "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
    return reference_train(model, opt, batches)


def test_data_parallel_order_splits_each_micro_batch_by_rank():
    batches = er._global_batches(2, 2)
    split = data_parallel_order(batches, 2)
    assert len(split) == len(batches) and all(len(m) == 4 for m in split)
    x, _ = batches[0][0]
    assert torch.equal(torch.cat([split[0][0][0], split[0][1][0]]), x)


def test_bound_is_measured_and_follows_its_formula():
    ref = er.reference(2, 1)
    b = ref.bound
    assert b is not None and 0 < b.fp32.state < 1e-4 and 0 < b.reordered.state < 1e-4
    assert b.state == pytest.approx(b.fp32.state + KAPPA * max(b.fp32.state, b.reordered.state))
    assert b.norms == pytest.approx(b.fp32.norms + KAPPA * max(b.fp32.norms, b.reordered.norms))


@pytest.mark.parametrize("error", ["lr_1_percent", "no_weight_decay", "steps_reordered", "one_rank_lost"])
def test_real_errors_exceed_the_bound(error):
    ref = er.reference(2, 1)
    batches = er._global_batches(2, 1)
    if error == "lr_1_percent":
        wrong = _train(batches, lr=er.LR * 1.01)
    elif error == "no_weight_decay":
        wrong = _train(batches, weight_decay=0.0)
    elif error == "steps_reordered":
        wrong = _train(batches[:10] + batches[11:] + batches[10:11])
    else:
        wrong = _train([[(x[:2], y[:2]) for x, y in micro] for micro in batches])
    assert max_state_difference(wrong.state, ref.state) > 5 * ref.bound.state
