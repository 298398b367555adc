"""DeepSpeed's ``zero_to_fp32``: the API (``deepspeed.utils.zero_to_fp32``) and the script in each save_dir.

``save_checkpoint`` writes a ``zero_to_fp32.py`` into its ``save_dir`` as DeepSpeed does; running
``python zero_to_fp32.py . out_dir`` there (DeepSpeed's arguments) writes the consolidated fp32
weights. Both the functions and the script read deepshard checkpoints and DeepSpeed ZeRO-1/2/3
checkpoints (:mod:`deepshard.checkpoint.export` detects which), with no process group. Unlike
DeepSpeed's copy the script imports deepshard, which must be installed where it runs.

File names follow DeepSpeed: ``pytorch_model.bin`` (``torch.save``, every name, tied names sharing
a tensor; loads with ``weights_only=True``), or with ``safe_serialization`` ``model.safetensors``;
past ``max_shard_size`` HF-style shards plus an index. safetensors output is streamed (one tensor in
memory); a ``.bin`` shard is built in memory, as in DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from deepshard.checkpoint import layout
from deepshard.checkpoint.export import (
    export_safetensors,
    load_state_dict_from_zero_checkpoint,
    weights_reader,
)
from deepshard.checkpoint.export import (
    get_fp32_state_dict_from_zero_checkpoint as _fp32_state_dict,
)
from deepshard.checkpoint.manifest import CorruptCheckpointError
from deepshard.checkpoint.safetensors_stream import parse_size, plan_shards

__all__ = [
    "SCRIPT_NAME",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
    "main",
    "write_recovery_script",
]

SCRIPT_NAME = "zero_to_fp32.py"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

_SCRIPT = '''#!/usr/bin/env python
"""Consolidate this directory's ZeRO checkpoint into fp32 weights (written by deepshard's save_checkpoint).

    python zero_to_fp32.py . output_dir [--safe_serialization] [--max_shard_size 5GB] [-t TAG]

Same arguments as DeepSpeed's zero_to_fp32.py; needs deepshard installed (pip install deepshard).
"""
import sys

from deepshard.checkpoint.zero_to_fp32 import main

if __name__ == "__main__":
    sys.exit(main())
'''


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's whole fp32 state dict from a deepshard or DeepSpeed checkpoint (DeepSpeed's signature).

    ``lazy_mode=True`` (DeepSpeed returns tensors loaded on first use) is refused: stream to disk with
    :func:`convert_zero_checkpoint_to_fp32_state_dict` (``safe_serialization=True``) instead.
    """
    if lazy_mode:
        raise NotImplementedError(
            "get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True) is not implemented by deepshard; call it "
            "with lazy_mode=False, or stream the weights to disk with convert_zero_checkpoint_to_fp32_state_dict("
            "..., safe_serialization=True), which holds one tensor at a time."
        )
    return _fp32_state_dict(checkpoint_dir, tag, exclude_frozen_parameters)


def _write_bin(
    checkpoint_dir: str | os.PathLike[str], out: Path, max_shard_size: str | int, tag: str | None, exclude_frozen: bool
) -> list[Path]:
    reader = weights_reader(checkpoint_dir, tag)
    names = [n for n in reader.sources if not (exclude_frozen and n in reader.frozen)]
    shards = plan_shards((reader.spec(n, torch.float32) for n in names), parse_size(max_shard_size))
    aliases: dict[str, list[str]] = {}
    for alias, target in reader.aliases.items():
        aliases.setdefault(target, []).append(alias)
    count = len(shards)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        filename = BIN_NAME if count == 1 else f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin"
        state: dict[str, torch.Tensor] = {}
        for spec in shard.tensors:
            state[spec.name] = reader.read(spec.name, torch.float32)
            for alias in aliases.get(spec.name, []):
                state[alias] = state[spec.name]
        path = out / filename
        tmp = path.with_name(path.name + layout.TMP_MARK + "fp32")
        torch.save(state, tmp)
        os.replace(tmp, path)
        weight_map.update(dict.fromkeys(state, filename))
        written.append(path)
        del state
    if count > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
        (out / BIN_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / BIN_INDEX_NAME)
    return written


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    max_shard_size: str | int = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> list[Path]:
    """Write the checkpoint's fp32 weights into ``output_dir`` (DeepSpeed's function); return the files.

    ``checkpoint_dir`` is the ``save_dir`` (its ``latest`` or ``tag`` is used) or a tag directory,
    deepshard's or DeepSpeed's. ``safe_serialization`` writes safetensors (streamed), else
    ``pytorch_model.bin`` files.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        return export_safetensors(
            checkpoint_dir, out, tag=tag, dtype="fp32", max_shard_size=max_shard_size,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )  # fmt: skip
    return _write_bin(checkpoint_dir, out, max_shard_size, tag, exclude_frozen_parameters)


def write_recovery_script(save_dir: str | os.PathLike[str]) -> Path:
    """Write ``zero_to_fp32.py`` into ``save_dir`` (as DeepSpeed's ``save_checkpoint`` does); return its path."""
    path = Path(save_dir) / SCRIPT_NAME
    layout.write_text_atomic(path, _SCRIPT)
    path.chmod(0o755)
    return path


def build_parser() -> argparse.ArgumentParser:
    """DeepSpeed's ``zero_to_fp32.py`` arguments."""
    p = argparse.ArgumentParser(
        prog=SCRIPT_NAME,
        description="Consolidate a deepshard or DeepSpeed ZeRO checkpoint into fp32 weights.",
    )
    p.add_argument("checkpoint_dir", help="the checkpoint folder (save_dir, e.g. path/checkpoint-12) or a tag folder")
    p.add_argument("output_dir", help="directory for the fp32 weight files (e.g. path/checkpoint-12-output/)")
    p.add_argument("--max_shard_size", default="5GB", help="largest output file before sharding, e.g. 5GB")
    p.add_argument("--safe_serialization", action="store_true", help="write safetensors instead of torch.save files")
    p.add_argument("-t", "--tag", default=None, help="checkpoint tag, e.g. global_step1 (default: 'latest')")
    p.add_argument("--exclude_frozen_parameters", action="store_true", help="leave frozen parameters out")
    p.add_argument("-d", "--debug", action="store_true", help="accepted for DeepSpeed compatibility")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zero_to_fp32.py`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        files = convert_zero_checkpoint_to_fp32_state_dict(
            args.checkpoint_dir, args.output_dir, max_shard_size=args.max_shard_size,
            safe_serialization=args.safe_serialization, tag=args.tag,
            exclude_frozen_parameters=args.exclude_frozen_parameters,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, CorruptCheckpointError) as exc:
        sys.stderr.write(f"{SCRIPT_NAME}: error: {exc}\n")
        return 1
    sys.stdout.write("".join(f"{f}\n" for f in files))
    return 0
