"""The CUDA paths: accelerator, NCCL process group, engine parity on the GPU, pinned memory, checkpoints.

Skipped on machines without CUDA (CI has none); run on a lent GPU with ``python -m pytest tests/gpu``.
One GPU allows a one-rank NCCL group (NCCL refuses two ranks on one device), which still drives every
collective of stages 0–2 through NCCL, CUDA streams and device buffers.
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = 10
MICRO = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def nccl_group() -> Iterator[None]:
    """A one-rank NCCL group made through deepshard's own ``init_distributed``."""
    import deepshard

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepshard.init_distributed()
    assert torch.distributed.get_backend() == "nccl"
    yield
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _model(preset: str = "odd") -> torch.nn.Module:
    from deepshard.testing.models import GPT, PRESETS

    torch.manual_seed(0)
    return GPT(PRESETS[preset])


def _batches(preset: str = "odd", steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from deepshard.testing.models import PRESETS
    from deepshard.testing.parity import make_token_batches

    cfg = PRESETS[preset]
    return make_token_batches(cfg.vocab_size, cfg.seq_len, MICRO, steps, seed=1)


def _engine_losses(
    stage: int, dtype: str, preset: str = "odd", steps: int = STEPS
) -> tuple[list[float], Any]:
    import deepshard

    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
    }
    if dtype != "fp32":
        cfg[dtype] = {"enabled": True}
    engine, _, _, _ = deepshard.initialize(model=_model(preset), config=cfg)
    assert engine.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in engine.module.parameters())
    losses = []
    for x, y in _batches(preset, steps):
        loss = engine(x.cuda(), y.cuda())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses, engine


def _reference_losses() -> list[float]:
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for x, y in _batches():
        loss = model(x.cuda(), y.cuda())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_accelerator_is_cuda() -> None:
    from deepshard.accelerator import get_accelerator

    acc = get_accelerator()
    assert acc.name == "cuda"
    assert acc.communication_backend_name() == "nccl"
    assert acc.device_count() >= 1
    pinned = acc.pin_memory(torch.ones(1024))
    assert pinned.is_pinned()
    stream = acc.new_stream()
    assert stream is not None
    with acc.stream(stream):
        y = torch.ones(4, device="cuda") * 2
    acc.synchronize()
    assert float(y.sum()) == 8.0
    assert acc.is_bf16_supported()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp32_parity_with_pytorch_on_cuda(nccl_group: None, stage: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _reference_losses()
    got, _ = _engine_losses(stage, "fp32")
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (stage, got, ref)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_trains_on_cuda(nccl_group: None, stage: int, dtype: str) -> None:
    ref = _reference_losses()
    got, engine = _engine_losses(stage, dtype)
    assert all(torch.isfinite(torch.tensor(got)))
    # half-precision weights: the loss curve follows fp32 closely
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) < 3e-2, (got, ref)
    wanted = torch.bfloat16 if dtype == "bf16" else torch.float16
    assert all(p.dtype == wanted for p in engine.module.parameters())


def test_memory_breakdown_matches_cuda_allocations(nccl_group: None) -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    _, engine = _engine_losses(2, "bf16", preset="small", steps=2)
    mem = engine.memory_breakdown()
    held = torch.cuda.memory_allocated() - before
    print(f"memory_breakdown {mem} total {mem.total:,} B; CUDA allocated by the engine {held:,} B")
    # what the engine reports is really on the device
    assert mem.total <= held * 1.02, (mem, held)
    # 16 bytes per parameter at world 1, plus Adam's per-tensor step counters
    psi = sum(p.numel() for p in engine.module.parameters())
    assert 16 * psi <= mem.total <= 16 * psi + 8 * len(list(engine.module.parameters())), mem


def test_checkpoint_round_trip_on_cuda(nccl_group: None, tmp_path: Any) -> None:
    import deepshard

    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
    }
    batches = _batches()
    engine, _, _, _ = deepshard.initialize(model=_model(), config=copy.deepcopy(cfg))
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == STEPS // 2:
            engine.save_checkpoint(str(tmp_path))
        loss = engine(x.cuda(), y.cuda())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    resumed, _, _, _ = deepshard.initialize(model=_model(), config=copy.deepcopy(cfg))
    path, _ = resumed.load_checkpoint(str(tmp_path))
    assert path is not None
    after = []
    for x, y in batches[STEPS // 2 :]:
        loss = resumed(x.cuda(), y.cuda())
        resumed.backward(loss)
        resumed.step()
        after.append(float(loss))
    assert after == losses[STEPS // 2 :]
