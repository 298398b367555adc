"""Checkpoints in one process: round trips per precision, safety, async save, export and the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.utils.data import TensorDataset

import deepshard
from deepshard.checkpoint import (
    CheckpointReader,
    CorruptCheckpointError,
    export_safetensors,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
)
from deepshard.checkpoint._blocks import row_blocks
from deepshard.checkpoint.convert import main as convert_main
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches

TINY = PRESETS["tiny"]
BATCHES = make_token_batches(TINY.vocab_size, TINY.seq_len, 2, 10, seed=3)


def make_engine(precision: str | None = None, **extra: Any):
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    }
    if precision:
        cfg[precision] = {"enabled": True}
    cfg.update(extra)
    data = TensorDataset(torch.arange(64))
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           training_data=data)
    return engine


def train(engine, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("precision", [None, "bf16", "fp16"], ids=["fp32", "bf16", "fp16"])
def test_round_trip_resumes_bit_for_bit(precision, stage, tmp_path):
    # one rank: stages 1-2 hold "shards" of every row (the distributed cases are in tests/distributed)
    zero = {"zero_optimization": {"stage": stage}}
    engine = make_engine(precision, **zero)
    train(engine, BATCHES[:4])  # two optimizer steps of two micro-batches
    engine.training_dataloader.epoch = 3
    path = engine.save_checkpoint(tmp_path, client_state={"note": "hi", "step": 5})
    assert path == str(tmp_path / "global_step2") and (tmp_path / "latest").read_text() == "global_step2"
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    expected = train(engine, BATCHES[4:])

    fresh = make_engine(precision, **zero)
    load_path, client = fresh.load_checkpoint(tmp_path)
    assert load_path == path and client == {"note": "hi", "step": 5}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert fresh.global_steps == 2 and fresh.micro_steps == 4 and fresh.training_dataloader.epoch == 3
    assert train(fresh, BATCHES[4:]) == expected  # exact: same ops on the same state
    assert fresh.get_lr() == engine.get_lr() and fresh.get_loss_scale() == engine.get_loss_scale()
    for k, v in params(fresh).items():
        assert torch.equal(v, params(engine)[k]), k


def test_every_file_is_weights_only_or_dcp(tmp_path):
    engine = make_engine("bf16")
    train(engine, BATCHES[:2])
    path = Path(engine.save_checkpoint(tmp_path, tag="t"))
    names = sorted(os.listdir(path))
    assert names == [".metadata", "__0_0.distcp", "engine_state.pt", "manifest.json", "rank_00000.pt"]
    for name in names:
        if name.endswith(".pt"):
            torch.load(path / name, weights_only=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert all(manifest["files"][n]["bytes"] == (path / n).stat().st_size for n in manifest["files"])


def test_nothing_to_load_returns_none(tmp_path, caplog):
    engine = make_engine()
    assert engine.load_checkpoint(tmp_path) == (None, None)
    assert engine.load_checkpoint(tmp_path, tag="nope") == (None, None)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_file_is_named(damage, tmp_path):
    engine = make_engine()
    train(engine, BATCHES[:2])
    path = Path(engine.save_checkpoint(tmp_path))
    victim = path / ("manifest.json" if damage == "manifest" else "__0_0.distcp")
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(data)
    else:
        victim.write_bytes(data[:10])
    with pytest.raises(CorruptCheckpointError, match=str(victim).replace(".", r"\.")):
        make_engine().load_checkpoint(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="__0_0|manifest"):
        get_fp32_state_dict_from_zero_checkpoint(tmp_path)


def test_strict_mismatch_and_overwrite_same_tag(tmp_path):
    engine = make_engine()
    engine.save_checkpoint(tmp_path, tag="same")
    train(engine, BATCHES[:2])
    engine.save_checkpoint(tmp_path, tag="same")  # replaces the older save of the tag
    assert sorted(os.listdir(tmp_path)) == ["latest", "same", "zero_to_fp32.py"]  # + DeepSpeed's script (#14)
    other = GPT(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "n_layers": 1}))
    small, _, _, _ = deepshard.initialize(model=other, model_parameters=other.parameters(),
                                          config={"train_micro_batch_size_per_gpu": 2,
                                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="does not match the model"):
        small.load_checkpoint(tmp_path)
    path, _ = small.load_checkpoint(tmp_path, load_module_strict=False, load_optimizer_states=False)
    assert path is not None and torch.equal(small.module.tok.weight, engine.module.tok.weight)


def test_async_save_overlaps_training_and_snapshots_state(tmp_path):
    engine = make_engine("bf16")
    train(engine, BATCHES[:4])
    snapshot = params(engine)
    path = engine.save_checkpoint(tmp_path, async_save=True)
    losses = train(engine, BATCHES[4:8])  # runs while the checkpoint is written; mutates every tensor
    engine.wait_for_checkpoint()
    fresh = make_engine("bf16")
    fresh.load_checkpoint(tmp_path)
    for k, v in params(fresh).items():
        assert torch.equal(v, snapshot[k]), k  # the checkpoint holds the state at save time
    assert train(fresh, BATCHES[4:8]) == losses
    assert Path(path).is_dir() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # the next save waits for an in-flight one
    engine.save_checkpoint(tmp_path, tag="a", async_save=True)
    engine.save_checkpoint(tmp_path, tag="b", async_save=True)
    engine.wait_for_checkpoint()
    assert (tmp_path / "latest").read_text() == "b" and (tmp_path / "a" / "manifest.json").is_file()


def test_config_async_save_is_the_default_of_save_checkpoint(tmp_path):
    engine = make_engine(checkpoint={"async_save": True})
    train(engine, BATCHES[:2])
    io = engine._checkpoint_io()
    engine.save_checkpoint(tmp_path, tag="bg")  # async_save=None: the config's value
    assert io._thread is not None
    engine.wait_for_checkpoint()
    engine.save_checkpoint(tmp_path, tag="fg", async_save=False)  # the argument wins
    assert io._thread is None and (tmp_path / "bg" / "manifest.json").is_file()


@pytest.mark.parametrize("precision", [None, "bf16"], ids=["fp32", "bf16"])
def test_export_matches_parameters(precision, tmp_path):
    engine = make_engine(precision)
    train(engine, BATCHES[:4])
    engine.save_checkpoint(tmp_path / "ck")
    fp32 = {n: (engine.masters.master_of(p) if p.requires_grad else p).detach().float()
            for n, p in engine.module.named_parameters(remove_duplicate=False)}
    state = get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ck")
    assert state["head.weight"] is state["tok.weight"]  # tied: both names, one tensor
    for name, value in fp32.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name

    # export streams each tensor from the files in bounded blocks, in row-major order
    reader = CheckpointReader(tmp_path / "ck")
    key = reader.sources["tok.weight"]
    blocks = row_blocks(reader.path, key, reader.meta[key], reader._storage, torch.float32, block_bytes=4096)
    assert blocks is not None
    pieces = [b.clone() for b in blocks]
    assert len(pieces) > 1 and max(b.numel() for b in pieces) == 1024
    assert torch.equal(torch.cat(pieces), state["tok.weight"].reshape(-1))

    files = export_safetensors(tmp_path / "ck", tmp_path / "one")
    assert [f.name for f in files] == ["model.safetensors"]
    single = safetensors.torch.load_file(files[0])
    assert "head.weight" not in single and "tok.weight" in single  # tied weights once, HF-style
    assert all(torch.equal(single[k], state[k]) for k in single)

    assert convert_main([str(tmp_path / "ck"), str(tmp_path / "many"), "--dtype", "bf16", "--max_shard_size", "40KB"]) == 0
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(safetensors.torch.load_file(tmp_path / "many" / shard))
    assert set(merged) == set(single) and index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values())
    assert all(torch.equal(merged[k], single[k].to(torch.bfloat16)) for k in merged)

    model = GPT(TINY)
    load_state_dict_from_zero_checkpoint(model, tmp_path / "ck")
    assert all(torch.equal(p.detach(), fp32[n]) for n, p in model.named_parameters())


def test_convert_errors_and_16bit_model(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "deepshard convert: error" in capsys.readouterr().err
    engine = make_engine("bf16")
    train(engine, BATCHES[:2])
    engine.save_16bit_model(tmp_path, "model.safetensors")
    engine.save_16bit_model(tmp_path)
    st = safetensors.torch.load_file(tmp_path / "model.safetensors")
    pt = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    module = engine.module.state_dict()
    assert set(pt) == set(module) and set(st) == set(module) - {"head.weight"}
    assert all(torch.equal(pt[k], module[k]) and pt[k].dtype == torch.bfloat16 for k in module)
    assert pt["head.weight"].data_ptr() == pt["tok.weight"].data_ptr()


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time, torch, deepshard
    import torch.distributed.checkpoint as dcp
    from deepshard.checkpoint import layout
    sys.path.insert(0, {tests!r})
    from test_checkpoint import BATCHES, make_engine, train

    where, root = sys.argv[1], sys.argv[2]
    engine = make_engine()
    train(engine, BATCHES[:2])
    engine.save_checkpoint(root)  # complete: global_step1
    train(engine, BATCHES[2:4])

    def stall(*args, **kwargs):
        print("STALLED", flush=True)
        time.sleep(600)

    if where == "write":  # die while DCP writes tensor data
        real = dcp.FileSystemWriter.write_data
        def slow(self, plan, planner):
            open(self.path / "__partial.distcp", "wb").write(b"x" * 1000)
            stall()
        dcp.FileSystemWriter.write_data = slow
    else:  # die after the data and manifest, just before the rename
        layout.commit = stall
    engine.save_checkpoint(root)
    """
)


@pytest.mark.parametrize("where", ["write", "commit"])
def test_sigkill_during_save_keeps_previous_checkpoint(where, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD.format(tests=str(Path(__file__).parent)))
    root = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), where, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "STALLED" not in proc.stdout.readline():
            assert proc.poll() is None, "the child exited before stalling"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (root / "latest").read_text() == "global_step1"
    assert [p for p in os.listdir(root) if ".tmp-" in p]  # the half-written save is left aside
    engine = make_engine()
    path, _ = engine.load_checkpoint(root)
    assert path == str(root / "global_step1") and engine.global_steps == 1
    engine.save_checkpoint(root, tag="after")  # the next save cleans the debris up
    assert sorted(os.listdir(root)) == ["after", "global_step1", "latest", "zero_to_fp32.py"]
