"""Quantization-aware training: grids, groups, rounding, STE, MoQ bit schedule, activation quantization."""

from __future__ import annotations

import pytest
import torch
from compress_models import TinyTransformer
from torch import nn

from deepshard.compression.compress import init_compression, redundancy_clean
from deepshard.compression.layers import CompressedLinear, Technique
from deepshard.compression.quantizers import (
    ActivationQuantizer,
    Rounding,
    fake_quantize_weight,
    quantize_asymmetric,
    quantize_symmetric,
    quantize_weight,
)
from deepshard.compression.scheduler import CompressionScheduler


def _distinct_per_group(q: torch.Tensor, groups: int) -> int:
    return max(int(torch.unique(g).numel()) for g in q.reshape(groups, -1))


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_at_most_2_pow_bits_values_per_group_and_error_bound(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    groups = 16 * 4
    q = quantize_weight(w, bits, groups, symmetric)
    assert _distinct_per_group(q, groups) <= 2**bits
    g, qg = w.reshape(groups, -1), q.reshape(groups, -1)
    # nearest rounding: |w - q| <= scale / 2, except at the clamped top of the symmetric grid (one step)
    if symmetric:
        scale = 2 * g.abs().amax(-1, keepdim=True) / 2**bits
        assert bool(((g - qg).abs() <= scale + 1e-6).all())
        inside = g < (2 ** (bits - 1) - 1) * scale
        assert bool(((g - qg).abs()[inside] <= scale.expand_as(g)[inside] / 2 + 1e-6).all())
    else:
        # DeepSpeed's grid: n steps of (max - min) / n from a zero rounded by up to half a step, of which
        # only n - 1 steps are used: the top of the range can sit 1.5 steps above the grid
        scale = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 2**bits
        assert bool(((g - qg).abs() <= 1.5 * scale + 1e-6).all())


def test_ternary_and_binary_grids() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    t = quantize_weight(w, 2, 8, True)
    b = quantize_weight(w, 1, 8, True)
    assert _distinct_per_group(t, 8) <= 3 and _distinct_per_group(b, 8) == 2
    assert torch.equal(torch.sign(b), torch.sign(w))
    with pytest.raises(ValueError, match="symmetric"):
        quantize_weight(w, 2, 8, False)


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((20000,), 0.3)
    x[0] = 1.0  # sets the range: scale = 2 / 2**4 = 0.125, 0.3 lies 40 % of the way from 0.25 to 0.375
    q = quantize_symmetric(x, 4, 1, Rounding.STOCHASTIC)[1:]
    assert set(q.unique().tolist()) == {0.25, 0.375}
    # mean of 19999 draws of a two-point variable with std 0.125 * sqrt(0.4 * 0.6): 5 sigma bound
    assert abs(q.mean().item() - 0.3) < 5 * 0.125 * (0.24 / 19999) ** 0.5
    assert torch.equal(quantize_symmetric(x, 4, 1)[1:], torch.full((19999,), 0.25))


def test_straight_through_gradient() -> None:
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8)
    (x @ fake_quantize_weight(w, 4, 4, True).t()).pow(2).sum().backward()
    wq = quantize_weight(w.detach(), 4, 4, True).requires_grad_()
    (x @ wq.t()).pow(2).sum().backward()
    assert torch.allclose(w.grad, wq.grad)


def test_activation_quantization_dynamic_per_token_and_static_ema() -> None:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 11).reshape(
        2, 5, 1
    )
    dyn = ActivationQuantizer(8, symmetric=True, static=False)(x)
    assert torch.allclose(dyn, quantize_symmetric(x, 8, 10))
    assert _distinct_per_group(dyn, 10) <= 256
    static = ActivationQuantizer(4, symmetric=False, static=True)
    static.train()
    static(x)
    first = torch.stack((x.min(), x.max()))
    assert torch.allclose(static.x_min_max, first)  # initialised, then EMA with itself
    static(2 * x)
    assert torch.allclose(static.x_min_max, 0.95 * first + 0.05 * 2 * first)
    static.eval()
    before = static.x_min_max.clone()
    out = static(x)
    assert torch.equal(static.x_min_max, before)
    assert torch.allclose(out, quantize_asymmetric(x, 4, lo=before[0], hi=before[1]))


def _wq_config(offset: int, in_forward: bool, start: int, target: int, period: int, groups: int = 1) -> dict:
    return {
        "compression_training": {
            "weight_quantization": {
                "shared_parameters": {
                    "enabled": True,
                    "schedule_offset": offset,
                    "quantize_groups": groups,
                    "quantize_weight_in_forward": in_forward,
                },
                "different_groups": {
                    "wq": {
                        "params": {"start_bits": start, "target_bits": target, "quantization_period": period},
                        "modules": [r"fc\d"],
                    }
                },
            }
        }
    }


def test_moq_bit_schedule_and_offset() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = _wq_config(offset=3, in_forward=False, start=8, target=4, period=2, groups=4)
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    fc1 = model.layers[0].fc1
    assert isinstance(fc1, CompressedLinear) and isinstance(model.layers[0].attn.query, CompressedLinear)
    bits = []
    w0 = fc1.weight.detach().clone()
    for step in range(1, 40):
        sched.step()
        if step < 3:
            assert torch.equal(fc1.weight, w0)  # before schedule_offset nothing changes
        bits.append(fc1.weight_quant.bits)
        assert _distinct_per_group(fc1.weight.detach(), 4) <= 2**fc1.weight_quant.bits
    # quantization steps k = step - 2; a bit is lost when k reaches the period, which then doubles: 2, 4, 8, 16
    expected = [8, 8] + [8 - sum(k >= p for p in (2, 4, 8, 16)) for k in range(1, 38)]
    assert bits == expected
    assert model.layers[0].attn.query.weight_quant is None


def test_in_forward_quantization_and_clean() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = _wq_config(offset=0, in_forward=True, start=4, target=4, period=1, groups=16)
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    ids = torch.randint(0, 32, (3, 6))
    fc1 = model.layers[0].fc1
    assert Technique.WEIGHT_QUANTIZATION in fc1.active
    out = model(ids)
    out.sum().backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    redundancy_clean(model, cfg)
    assert _distinct_per_group(fc1.weight.detach(), 16) <= 16
    assert torch.allclose(model(ids), out, atol=1e-6)  # baked weights compute the fake-quantized forward


def test_qat_training_reduces_loss_with_ternary_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    cfg = {
        "compression_training": {
            "weight_quantization": {
                "shared_parameters": {
                    "enabled": True,
                    "quantize_weight_in_forward": True,
                    "quantize_groups": 8,
                },
                "different_groups": {
                    "t": {"params": {"start_bits": 2, "target_bits": 2}, "modules": ["0", "2"]}
                },
            }
        }
    }
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    x = torch.randn(64, 8)
    y = x[:, :1] - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(60):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    redundancy_clean(model, cfg)
    assert _distinct_per_group(model[0].weight.detach(), 8) <= 3


def test_scheduler_needs_init_compression() -> None:
    cfg = _wq_config(offset=0, in_forward=True, start=8, target=8, period=1)
    with pytest.raises(ValueError, match="call init_compression"):
        CompressionScheduler(TinyTransformer(), cfg)
