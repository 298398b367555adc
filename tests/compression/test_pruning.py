"""Pruning masks and schedules, and redundancy_clean's physical removal (output equal to the masked model's)."""

from __future__ import annotations

import math

import pytest
import torch
from compress_models import TinyConv, TinyTransformer

from deepshard.compression.compress import init_compression, redundancy_clean
from deepshard.compression.layers import Technique
from deepshard.compression.scheduler import CompressionScheduler


def _cfg(technique: str, shared: dict, groups: dict) -> dict:
    return {
        "compression_training": {
            technique: {"shared_parameters": {"enabled": True, **shared}, "different_groups": groups}
        }
    }


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("_scores"))


@pytest.mark.parametrize("method", ["l1", "topk"])
def test_sparse_mask_density_and_offset(method: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = _cfg(
        "sparse_pruning",
        {"method": method, "schedule_offset": 2},
        {"sp": {"params": {"dense_ratio": 0.3}, "modules": [r"fc\d"]}},
    )
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    fc1 = model.layers[0].fc1
    ids = torch.randint(0, 32, (2, 5))
    dense = model(ids)
    sched.step()
    assert Technique.SPARSE_PRUNING not in fc1.active and torch.equal(model(ids), dense)
    sched.step()
    assert Technique.SPARSE_PRUNING in fc1.active
    mask = fc1.mask(Technique.SPARSE_PRUNING)
    assert mask.sum().item() == math.ceil(0.3 * fc1.weight.numel())
    if method == "l1":  # the kept weights are the largest in magnitude
        kept, dropped = fc1.weight.abs()[mask.bool()], fc1.weight.abs()[~mask.bool()]
        assert kept.min() >= dropped.max()
    else:  # learned scores receive the task gradient through the mask
        model(ids).sum().backward()
        assert fc1.sparse_mask_scores.grad is not None and fc1.sparse_mask_scores.grad.abs().sum() > 0
    with torch.no_grad():
        masked = model(ids)
    redundancy_clean(model, cfg)
    assert torch.allclose(model(ids), masked, atol=1e-6)
    assert (fc1.weight == 0).sum().item() >= fc1.weight.numel() - math.ceil(0.3 * fc1.weight.numel())
    assert not hasattr(fc1, "sparse_mask_scores") and not fc1.masks


def test_snip_momentum_block_pattern_and_gradual_schedule() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = _cfg(
        "sparse_pruning",
        {
            "method": "snip_momentum",
            "schedule_offset": 1,
            "schedule_offset_end": 5,
            "schedule_offset_stride": 2,
            "block_pattern": "4x1",
            "dense_ratio": 0.25,
            "excluded_modules": ["layers.1"],
        },
        {"sp": {"params": {"dense_ratio": 0.25}, "modules": [r"fc\d"]}},
    )
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ids = torch.randint(0, 32, (4, 5))
    fc1 = model.layers[0].fc1
    densities = []
    for _ in range(6):
        loss = model(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        densities.append(fc1.sparse_pruning_mask.mean().item())
    assert densities[0] == pytest.approx(1.0) and densities[-1] == pytest.approx(0.25)
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    blocks = fc1.sparse_pruning_mask.reshape(-1, 4, fc1.in_features)
    assert bool((blocks == blocks[:, :1]).all())  # 4x1: four consecutive rows of a column share the mask
    assert Technique.SPARSE_PRUNING not in model.layers[1].fc1.masks  # excluded


def _row_head_config(method: str) -> dict:
    return {
        "compression_training": {
            "row_pruning": {
                "shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0},
                "different_groups": {
                    "rp": {"params": {"dense_ratio": 0.5}, "modules": ["fc1"], "related_modules": [["fc2"]]}
                },
            },
            "head_pruning": {
                "shared_parameters": {
                    "enabled": True,
                    "method": method,
                    "schedule_offset": 0,
                    "num_heads": 4,
                },
                "different_groups": {
                    "hp": {
                        "params": {"dense_ratio": 0.5},
                        "modules": ["attn.output"],
                        "related_modules": [["attn.query", "attn.key", "attn.value"]],
                    }
                },
            },
        }
    }


@pytest.mark.parametrize("method", ["l1", "topk"])
def test_row_and_head_pruning_redundancy_clean_removes_and_matches(method: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer(dim=16, heads=4)
    cfg = _row_head_config(method)
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    layer = model.layers[0]
    assert layer.fc1.mask(Technique.ROW_PRUNING).sum().item() == 32
    assert layer.attn.output.mask(Technique.HEAD_PRUNING).sum().item() == 2
    ids = torch.randint(0, 32, (3, 7))
    with torch.no_grad():
        masked = model(ids)
    before = _params(model)
    redundancy_clean(model, cfg)
    with torch.no_grad():
        cleaned = model(ids)
    assert torch.allclose(cleaned, masked, atol=1e-5), (cleaned - masked).abs().max()
    assert (
        layer.fc1.out_features,
        layer.fc2.in_features,
        layer.attn.query.out_features,
        layer.attn.output.in_features,
    ) == (32, 32, 8, 8)
    # removed: per layer, 32 rows of fc1 (+bias) and columns of fc2; 2 heads of q/k/v rows (+bias) and o columns
    removed = 2 * (32 * 16 + 32 + 32 * 16 + 3 * (8 * 16 + 8) + 16 * 8)
    assert before - _params(model) == removed


def test_row_pruning_without_related_modules_zeroes_in_place() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = _cfg(
        "row_pruning", {"schedule_offset": 0}, {"rp": {"params": {"dense_ratio": 0.25}, "modules": ["fc1"]}}
    )
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    redundancy_clean(model, cfg)
    w = model.layers[0].fc1.weight
    assert w.shape == (64, 16) and int((w.abs().sum(1) > 0).sum()) == 16


@pytest.mark.parametrize("method", ["l1", "topk"])
def test_channel_pruning_conv_bn_redundancy_clean(method: str) -> None:
    torch.manual_seed(0)
    model = TinyConv()
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    cfg = _cfg(
        "channel_pruning",
        {"method": method, "schedule_offset": 0},
        {"cp": {"params": {"dense_ratio": 0.5}, "modules": ["conv1"], "related_modules": [["bn1", "conv2"]]}},
    )
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    x = torch.randn(2, 3, 6, 6)
    keep = model.conv1.mask(Technique.CHANNEL_PRUNING).detach()
    assert keep.sum().item() == 4
    # a masked channel is zero before the BN but its shift makes it a constant after; the cleaned model has no
    # such channel, so the masked reference zeroes the pruned channels after the BN too (DeepSpeed prunes so)
    hook = model.bn1.register_forward_hook(lambda m, i, o: o * keep[None, :, None, None])
    with torch.no_grad():
        masked = model(x)
    hook.remove()
    before = _params(model)
    redundancy_clean(model, cfg)
    with torch.no_grad():
        cleaned = model(x)
    assert model.conv1.out_channels == 4 and model.bn1.num_features == 4 and model.conv2.in_channels == 4
    assert torch.allclose(cleaned, masked, atol=1e-5), (cleaned - masked).abs().max()
    assert before - _params(model) == 4 * (3 * 9 + 1) + 4 * 2 + 6 * 4 * 9
