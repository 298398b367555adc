"""Post-training quantization: group-wise/token-wise W8A8, GPTQ, SmoothQuant, and export to the inference engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepshard
from deepshard.compression.ptq import PTQLinear, PTQRecipe, export_packed, gptq, quantize_model
from deepshard.inference.config import PostInitQuantEntry
from deepshard.inference.quant import QuantizedLinear, quantize, quantize_linears


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


def _inputs(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 30.0  # an outlier channel, as in real transformer activations
    return x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_export_is_what_init_inference_builds_and_runs(bits: int, symmetric: bool) -> None:
    model = _mlp()
    reference = _mlp()
    quantize_model(
        model, PTQRecipe(weight_bits=bits, weight_group_size=32, symmetric=symmetric, act_bits=None)
    )
    x = _inputs(8, 1)
    with torch.no_grad():
        fake = model(x)
    export_packed(model)
    assert isinstance(model[0], QuantizedLinear)
    assert model[0].qweight.shape == ((128, 32) if bits == 4 else (128, 64))  # 4 bits: two values per byte
    # the same integers as the inference engine's own post_init_quant of the float model
    quantize_linears(reference, {"": PostInitQuantEntry(num_bits=bits, group_size=32, symmetric=symmetric)})
    assert torch.equal(model[0].qweight, reference[0].qweight) and torch.equal(
        model[0].scale, reference[0].scale
    )
    engine = deepshard.init_inference(model, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(engine(x), fake, atol=1e-5)


def test_int8_storage_ratio() -> None:
    layer = _mlp()[0]
    q8 = QuantizedLinear(layer, bits=8, group_size=64, symmetric=True)
    q4 = QuantizedLinear(layer, bits=4, group_size=64, symmetric=True)
    fp = layer.weight.numel() * 4
    # 1 byte (0.5 byte) per weight plus one fp32 scale per 64 weights
    assert fp / q8.storage_bytes() == 4 / (1 + 4 / 64) and fp / q4.storage_bytes() == 4 / (0.5 + 4 / 64)


def test_token_wise_beats_per_tensor_activations() -> None:
    x, calib = _inputs(64, 2), [_inputs(64, 3)]
    ref = _mlp()(x)
    errs = {}
    for key, recipe in {
        "token": PTQRecipe(act_bits=8, act_granularity="token"),
        "tensor": PTQRecipe(act_bits=8, act_granularity="tensor", weight_group_size=None),
        "smooth": PTQRecipe(act_bits=8, act_granularity="tensor", weight_group_size=None, smooth_alpha=0.5),
    }.items():
        model = _mlp()
        quantize_model(model, recipe, calibration=calib)
        with torch.no_grad():
            errs[key] = (model(x) - ref).pow(2).mean().item()
    assert errs["token"] < errs["tensor"] and errs["smooth"] < errs["tensor"]


def test_gptq_lowers_output_error_and_keeps_the_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs, where GPTQ helps
    h = x.t() @ x
    q, scale, zero = gptq(w, h, 4, 32, True)
    assert zero is None and int(q.abs().max()) <= 7
    deq = (q.float().reshape(48, 4, 32) * scale[..., None]).reshape(48, 128)
    rq, rs, _ = quantize(w, 4, 32, True)
    rtn = (rq.float().reshape(48, 4, 32) * rs[..., None]).reshape(48, 128)
    err_gptq = (x @ (w - deq).t()).pow(2).mean()
    err_rtn = (x @ (w - rtn).t()).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn
    for g in range(4):  # each row group takes at most 2**4 - 1 symmetric values
        assert max(torch.unique(q[r, g * 32 : (g + 1) * 32]).numel() for r in range(48)) <= 15


def test_gptq_model_export_roundtrip() -> None:
    model = _mlp()
    calib = [_inputs(64, 4)]
    quantize_model(
        model, PTQRecipe(weight_bits=4, weight_group_size=32, act_bits=None, gptq=True), calibration=calib
    )
    assert isinstance(model[2], PTQLinear)
    x = _inputs(4, 5)
    with torch.no_grad():
        fake = model(x)
    export_packed(model)
    with torch.no_grad():
        assert torch.allclose(model(x), fake, atol=1e-5)
