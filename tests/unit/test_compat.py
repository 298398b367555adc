"""DeepSpeed's import paths (deepshard.compat.table), the ``import deepspeed`` alias, and the DeepSpeed
helpers served through it (moe.utils, ops.adam, zero_to_fp32). Alias checks run in fresh interpreters
so that they see a process where nothing was imported before."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

import deepshard
from deepshard.compat import ALIAS_PATH, DISTRIBUTION_VERSION, PATHS, DeepSpeedFeatureNotImplemented
from deepshard.compat._finder import is_real
from deepshard.compat.moe_utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepshard.compat.table import Refused
from deepshard.runtime.optimizers import DeepSpeedCPUAdam, FusedAdam

SRC = str(Path(deepshard.__file__).resolve().parents[1])
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed"


def _python(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*(env_extra or {}).pop("PREPEND", "").split(":"), SRC])}
    env.update(env_extra or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------- the table
@pytest.mark.parametrize("path", sorted(p for p in PATHS if p))
def test_every_table_row_resolves_under_deepshard(path):
    entry = PATHS[path]
    if isinstance(entry, Refused):
        with pytest.raises(DeepSpeedFeatureNotImplemented, match=r"is not implemented by deepshard"):
            importlib.import_module(f"deepshard.{path}")
        return
    if entry.extends is not None:  # exists only as deepspeed.<path>; the deepshard module is real
        assert is_real(path) and importlib.import_module(entry.extends)
        return
    assert not is_real(path), f"deepshard.{path} is a real module: drop the table row (it would never be used)"
    module = importlib.import_module(f"deepshard.{path}")
    for name, target in entry.names.items():
        value = getattr(module, name)
        if isinstance(target, Refused):
            with pytest.raises(DeepSpeedFeatureNotImplemented, match=rf"{name} \(.*\) is not implemented"):
                value()
        else:
            module_name, _, attr = target.partition(":")
            assert value is getattr(importlib.import_module(module_name), attr)


def test_unknown_name_says_it_is_not_implemented():
    import deepshard.ops.adam as adam

    with pytest.raises(AttributeError, match=r"deepspeed.ops.adam.NoSuchAdam is not implemented by deepshard"):
        _ = adam.NoSuchAdam
    assert not hasattr(deepshard, "pipe")  # refused module: hasattr is False, not an exception


def test_top_level_subpackages_are_attributes_in_a_fresh_process():
    out = _python(
        """
        import deepshard as deepspeed
        print(deepspeed.zero.Init.__name__, deepspeed.comm.get_rank(), deepspeed.ops.adam.FusedAdam.__name__,
              deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES[0], deepspeed.checkpoint.__name__)
        """
    )
    assert out.split() == ["Init", "0", "FusedAdam", "LRRangeTest", "deepshard.checkpoint"]


# ---------------------------------------------------------------------- the alias
def test_install_makes_import_deepspeed_resolve_to_deepshard():
    out = _python(
        """
        import importlib.metadata, importlib.util, deepshard.compat
        deepshard.compat.install()
        import deepspeed, deepshard, deepshard.zero
        import deepspeed.zero
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.accelerator import get_accelerator
        import deepshard.ops.adam
        print(deepspeed.zero is deepshard.zero, deepshard.zero.__spec__.name,
              DeepSpeedCPUAdam is deepshard.ops.adam.DeepSpeedCPUAdam, DeepSpeedEngine is deepshard.DeepShardEngine)
        print(importlib.metadata.version("deepspeed"), importlib.util.find_spec("deepspeed") is not None)
        try:
            import deepspeed.no_such_module
        except ModuleNotFoundError as exc:
            print("missing:", "not implemented by deepshard" in str(exc))
        deepshard.compat.uninstall()
        print(importlib.util.find_spec("deepspeed") is None)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "True deepshard.zero True True"
    assert lines[1] == f"{DISTRIBUTION_VERSION} True"
    assert lines[2] == "missing: True" and lines[3] == "True"


def test_alias_path_serves_an_unmodified_script():
    # what the launcher does with --as_deepspeed on: the alias directory first on PYTHONPATH
    assert (ALIAS_PATH / f"deepspeed-{DISTRIBUTION_VERSION}.dist-info" / "METADATA").is_file()
    out = _python(
        """
        import importlib.metadata
        print(importlib.metadata.version("deepspeed"))  # before any import, as transformers checks
        import deepspeed
        print(type(deepspeed).__name__, deepspeed.initialize.__module__)
        """,
        {"PREPEND": str(ALIAS_PATH)},
    )
    assert out.split() == [DISTRIBUTION_VERSION, "CompatModule", "deepshard.runtime.initialize"]


def test_transformers_and_accelerate_see_deepspeed():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _python(
        """
        import deepshard.compat
        deepshard.compat.install()
        from transformers.integrations import is_deepspeed_available
        from accelerate.utils import is_deepspeed_available as accelerate_sees
        print(is_deepspeed_available(), accelerate_sees())
        """
    )
    assert out.split() == ["True", "True"]


def test_launcher_flag(monkeypatch):
    from deepshard.launcher.launch import _deepspeed_alias

    monkeypatch.setattr("deepshard.compat.real_deepspeed_location", lambda: None)
    assert _deepspeed_alias("auto", {"PYTHONPATH": "x"})["PYTHONPATH"] == f"{ALIAS_PATH}{os.pathsep}x"
    assert _deepspeed_alias("off", {})  == {}
    monkeypatch.setattr("deepshard.compat.real_deepspeed_location", lambda: "/site/deepspeed")
    assert _deepspeed_alias("auto", {}) == {}  # DeepSpeed itself is installed: it runs
    assert _deepspeed_alias("on", {})["PYTHONPATH"] == str(ALIAS_PATH)


# ---------------------------------------------------------------------- moe.utils
def test_moe_groups_split_marked_expert_parameters():
    shared = torch.nn.Parameter(torch.zeros(3))
    experts = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    for p in experts:
        p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's marker, set by its MoE layer
        p.group_name = "ep_size_1"  # type: ignore[attr-defined]
    assert not is_moe_param(shared) and all(is_moe_param(p) for p in experts)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [shared, *experts], "name": "parameters", "lr": 0.1}, max_group_size=8
    )
    assert [g["name"] for g in groups] == ["parameters", "ep_size_1", "ep_size_1"]
    assert groups[0]["params"] == [shared] and groups[0]["lr"] == 0.1
    assert [len(g["params"]) for g in groups[1:]] == [2, 1] and all(g["moe"] and g["lr"] == 0.1 for g in groups[1:])
    plain = split_params_into_different_moe_groups_for_optimizer([{"params": [shared], "name": "p"}])
    assert len(plain) == 1 and plain[0]["params"] == [shared]  # no expert parameter: groups unchanged
    with pytest.raises(ValueError, match="needs a param-group dict or a list/tuple"):
        split_params_into_different_moe_groups_for_optimizer([shared])  # type: ignore[list-item]


# ---------------------------------------------------------------------- ops.adam
@pytest.mark.parametrize("decoupled", [True, False])
def test_deepspeed_adam_classes_match_torch(decoupled):
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(5))
    ours = [torch.nn.Parameter(ref.detach().clone()) for _ in range(2)]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opts = [
        cls([ref], lr=0.1, weight_decay=0.1),
        FusedAdam([ours[0]], lr=0.1, weight_decay=0.1, adam_w_mode=decoupled),
        DeepSpeedCPUAdam([ours[1]], lr=0.1, weight_decay=0.1, adamw_mode=decoupled),
    ]
    for _ in range(3):
        for p, opt in zip([ref, *ours], opts):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
    # fused vs the reference's default kernel: same formula, fp32 rounding order may differ (~1 ulp per step)
    for p in ours:
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"amsgrad=True\) is not supported"):
        FusedAdam([ref], amsgrad=True)


# ---------------------------------------------------------------------- zero_to_fp32
def test_zero_to_fp32_script_in_save_dir_and_api(tmp_path):
    from deepshard.checkpoint import get_fp32_state_dict_from_zero_checkpoint
    from deepshard.compat._finder import lookup

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    engine, *_ = deepshard.initialize(
        model=model, config={"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}
    )
    loss = engine(torch.randn(2, 4)).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(tmp_path / "ckpt")
    script = tmp_path / "ckpt" / "zero_to_fp32.py"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": SRC}
    for extra in ([], ["--safe_serialization"]):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "out"), *extra],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    whole = get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ckpt")
    binary = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    safe = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    for key, value in engine.module.state_dict().items():
        assert torch.equal(binary[key], value) and torch.equal(safe[key], value) and torch.equal(whole[key], value)
    convert = lookup("utils.zero_to_fp32", "convert_zero_checkpoint_to_fp32_state_dict", "deepshard.utils.zero_to_fp32")
    files = convert(FIXTURES / "zero2_fp32", tmp_path / "ds", max_shard_size="1KB")  # a DeepSpeed checkpoint
    assert files[-1].name == "pytorch_model.bin.index.json" and len(files) > 2
    with pytest.raises(NotImplementedError, match="lazy_mode=True"):
        lookup("utils.zero_to_fp32", "get_fp32_state_dict_from_zero_checkpoint", "x")(tmp_path / "ckpt", lazy_mode=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unmodified_deepspeed_script_on_two_ranks(tmp_path):
    # the launcher route: the script says `import deepspeed` and nothing about deepshard
    script = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed_scripts" / "train_ds.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = SRC
    done = subprocess.run(
        [sys.executable, "-m", "deepshard.launcher", "--num_procs", "2", "--master_port", str(_free_port()), "--as_deepspeed", "on",
         str(script), "--out", str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'import deepspeed' in the job resolves to deepshard" in done.stderr
    result = json.loads((tmp_path / "ckpt" / "result.json").read_text())
    assert result["world"] == 2 and result["engine"] == "deepshard.runtime.engine"
    assert result["lr"] == [1e-2] and result["fp32_matches"]  # the client FusedAdam's lr, not the config's 0.5
    assert (tmp_path / "ckpt" / "zero_to_fp32.py").is_file()


def test_hf_trainer_over_deepshard_matches_ddp_and_saves(tmp_path):
    # HF Trainer, unmodified, TrainingArguments(deepspeed={... "auto" ...}); HF's AdamW + linear schedule,
    # ZeRO-2, ZeRO-3, ZeRO-3 from from_pretrained, ZeRO-3 + CPU offload interrupted at step 10 and resumed
    # with resume_from_checkpoint; then greedy generate on every rank;
    # gradient accumulation 2, 20 steps, fp32 on 2 gloo ranks. ZeRO-2/3 vs the same Trainer on DDP: the same
    # reductions of the same fp32 gradients (sums of 2 ranks' means), so losses agree to fp32 rounding.
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    script = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "trainer_tiny.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = SRC
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "start")
    results = {}
    runs = [("zero2", ["--stage", "2"]), ("zero3", ["--stage", "3"]), ("ddp", []),
            ("zero3_loaded", ["--stage", "3", "--load", str(tmp_path / "start")]),
            ("zero3_offload_first10", ["--stage", "3", "--offload", "--stop_at", "10"]),
            ("zero3_offload_resumed", ["--stage", "3", "--offload", "--resume",
                                       str(tmp_path / "zero3_offload_first10.json.run" / "checkpoint-10")])]  # fmt: skip
    for label, extra in runs:
        out = tmp_path / f"{label}.json"
        done = subprocess.run(
            [sys.executable, "-m", "deepshard.launcher", "--num_procs", "2", "--master_port", str(_free_port()),
             "--as_deepspeed", "on", str(script), *extra, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[label] = json.loads(out.read_text())
    assert results["zero2"]["engine"] == results["zero3"]["engine"] == "deepshard.runtime.engine"
    assert results["ddp"]["engine"] == "torch.nn.parallel.distributed"
    # the interrupted run and its resumption (a new process: one Trainer with DeepSpeed per process) together
    first, rest = results.pop("zero3_offload_first10")["losses"], results["zero3_offload_resumed"]["losses"]
    assert len(first) == 10 and len(rest) >= 10
    results["zero3_offload_resumed"]["losses"] = first + rest[-10:]
    reference = results["ddp"]["losses"]
    assert len(reference) == 20
    # ZeRO-3 under from_pretrained: built partitioned (HfDeepSpeedConfig alive), then trained the same
    assert results["zero3_loaded"]["partitioned_at_load"] > 10 and results["zero3"]["partitioned_at_load"] == 0
    for label in ("zero2", "zero3", "zero3_loaded", "zero3_offload_resumed"):
        # greedy generate after training, prompts of different lengths per rank: the same tokens as DDP's
        assert results[label]["generated"] == results["ddp"]["generated"], label
        assert results[label]["losses"] == pytest.approx(reference, rel=1e-5), label
        # evaluate, then save_model (ZeRO-3: gathered on save) -> safetensors that from_pretrained reloads
        assert results[label]["eval_loss"] == pytest.approx(results["ddp"]["eval_loss"], rel=1e-5), label
        norms, ddp_norms = results[label]["norms"], results["ddp"]["norms"]
        assert norms.keys() == ddp_norms.keys() and len(norms) > 10
        assert list(norms.values()) == pytest.approx(list(ddp_norms.values()), rel=1e-5), label


def test_accelerate_deepspeed_plugin_matches_ddp(tmp_path):
    # an Accelerate loop with Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=N)), gradient
    # accumulation 2, clipping 1.0, on 2 gloo ranks: under deepshard's launcher at ZeRO-2 and ZeRO-3, and
    # under `accelerate launch --use_deepspeed` with the alias directory on PYTHONPATH; vs the same loop on
    # DDP: the same fp32 reductions, so losses and final weights agree to fp32 rounding (1e-5 relative)
    pytest.importorskip("accelerate")
    from deepshard.compat import ALIAS_PATH

    script = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "accelerate_loop.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = SRC
    alias = subprocess.run([sys.executable, "-m", "deepshard.compat"], env=env, capture_output=True, text=True)
    assert alias.stdout.strip() == str(ALIAS_PATH)
    ours = [sys.executable, "-m", "deepshard.launcher", "--num_procs", "2", "--as_deepspeed", "on"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
                  "--num_machines", "1", "--zero_stage", "2", "--gradient_accumulation_steps", "2"]  # fmt: skip
    runs = {
        "zero2": ([*ours, "--master_port", str(_free_port()), str(script), "--stage", "2"], SRC),
        "zero3": ([*ours, "--master_port", str(_free_port()), str(script), "--stage", "3"], SRC),
        "accelerate_launch_zero2": ([*accelerate, "--main_process_port", str(_free_port()), str(script),
                                     "--stage", "2"], os.pathsep.join([str(ALIAS_PATH), SRC])),  # fmt: skip
        "ddp": ([*ours[:-2], "--as_deepspeed", "off", "--master_port", str(_free_port()), str(script)], SRC),
    }
    results = {}
    for label, (command, path) in runs.items():
        out = tmp_path / f"{label}.json"
        done = subprocess.run([*command, "--out", str(out)], env={**env, "PYTHONPATH": path}, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)  # fmt: skip
        assert done.returncode == 0, (label, done.stderr[-3000:])
        results[label] = json.loads(out.read_text())
    reference = results.pop("ddp")
    assert reference["engine"] == "torch.nn.parallel.distributed" and len(reference["losses"]) == 8
    for label, result in results.items():
        assert result["engine"] == "deepshard.runtime.engine", label
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5), label
        assert result["norms"].keys() == reference["norms"].keys(), label
        assert list(result["norms"].values()) == pytest.approx(list(reference["norms"].values()), rel=1e-5), label
