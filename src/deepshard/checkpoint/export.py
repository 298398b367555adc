"""Consolidated weights out of a checkpoint: fp32 state dicts, safetensors export, 16-bit model files.

Export never needs the training job or a process group and never holds the whole model: tensors are
read from the DCP files one at a time, cast, and appended to a streaming safetensors writer. For
the layout deepshard writes (each stored chunk a block of dim-0 rows: whole replicated tensors, ZeRO
``Shard(0)`` shards saved on any number of ranks) each tensor is streamed in blocks of 16 MiB
(:mod:`._blocks`), so peak memory is a block, not a tensor. Anything else is read whole by a DCP
load plan for that one key (which reads every rank's rows of it): about twice that tensor.
:func:`get_fp32_state_dict_from_zero_checkpoint` builds whole tensors (it returns the model).

Values: a parameter with an fp32 master (bf16/fp16 training) is exported from the master; every
other entry (fp32 parameters, buffers) from the module state. Tied weights (one tensor under several
names, e.g. GPT-2's ``lm_head.weight`` and ``wte.weight``) are written once in safetensors, under
the first name in ``module.state_dict()`` order, as Hugging Face does (``tie_weights()`` restores
the others). The Python dict APIs and ``.bin`` files carry every name, sharing one tensor.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from deepshard.checkpoint import _dist, layout, manifest
from deepshard.checkpoint._blocks import row_blocks
from deepshard.checkpoint.deepspeed_import import read_deepspeed_checkpoint
from deepshard.checkpoint.load import read_engine_state, tensor_metadata
from deepshard.checkpoint.safetensors_stream import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorSpec,
    parse_size,
    plan_shards,
    write_index,
    write_shard,
)
from deepshard.checkpoint.state import MASTER, MODEL, module_entries
from deepshard.utils.logging import log_dist, logger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointReader:
    """Reads one verified checkpoint's model tensors by name, one at a time, without a process group."""

    def __init__(
        self, checkpoint_dir: str | os.PathLike[str], tag: str | None = None, verify: bool = True
    ) -> None:
        self.path = layout.resolve_checkpoint(checkpoint_dir, tag)
        if verify:
            manifest.verify_local(self.path)
        self.engine_state = read_engine_state(self.path)
        self.meta = tensor_metadata(self.path)
        self._reader = dcp.FileSystemReader(str(self.path))
        self._storage = self._reader.read_metadata().storage_data
        module = self.engine_state["module"]
        self.aliases: dict[str, str] = dict(module["aliases"])
        masters = set(self.engine_state["masters"])
        # output name -> DCP key holding its best (fp32 where available) value
        self.sources = {k: (MASTER + k if k in masters else MODEL + k) for k in module["keys"]}
        self.frozen = set(module["excluded_frozen"])

    def spec(self, name: str, dtype: torch.dtype | None) -> TensorSpec:
        """Output name, dtype (floating tensors cast to ``dtype``; others kept) and shape of ``name``."""
        md = self.meta[self.sources[name]]
        saved = md.properties.dtype
        out = dtype if dtype is not None and saved.is_floating_point else saved
        return TensorSpec(name, out, tuple(md.size))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (a module state key), from its master if it has one, cast like :meth:`spec`."""
        key = self.sources[name]
        md = self.meta[key]
        buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with _dist.quiet_single_process():
            dcp.load({key: buf}, storage_reader=self._reader, no_dist=True)
        spec = self.spec(name, dtype)
        return buf if buf.dtype == spec.dtype else buf.to(spec.dtype)

    def pieces(self, name: str, dtype: torch.dtype | None = None) -> Iterable[torch.Tensor]:
        """Like :meth:`read`, as flat row-major pieces of at most 16 MiB stored (one whole tensor if needed)."""
        key = self.sources[name]
        blocks = row_blocks(self.path, key, self.meta[key], self._storage, self.spec(name, dtype).dtype)
        return blocks if blocks is not None else [self.read(name, dtype).reshape(-1)]


class DeepSpeedWeightsReader:
    """:class:`CheckpointReader`'s interface over a DeepSpeed ZeRO checkpoint (read whole, fp32 weights only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state = read_deepspeed_checkpoint(path, optimizer_states=False)
        self.weights = state.weights
        self.aliases = {
            a: t for a, t in state.aliases.items() if t in state.weights and a not in state.weights
        }
        order = [n for n in state.order if n in state.weights] + [
            n for n in state.weights if n not in state.order
        ]
        self.sources = {n: n for n in order}
        self.frozen: set[str] = set()

    def spec(self, name: str, dtype: torch.dtype | None) -> TensorSpec:
        saved = self.weights[name].dtype
        return TensorSpec(
            name,
            dtype if dtype is not None and saved.is_floating_point else saved,
            tuple(self.weights[name].shape),
        )

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weights[name].to(self.spec(name, dtype).dtype)

    def pieces(self, name: str, dtype: torch.dtype | None = None) -> Iterable[torch.Tensor]:
        return [self.read(name, dtype).reshape(-1)]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def weights_reader(
    checkpoint_dir: str | os.PathLike[str], tag: str | None
) -> CheckpointReader | DeepSpeedWeightsReader:
    """A reader for a deepshard checkpoint, or for a DeepSpeed one (detected by its files)."""
    path = layout.resolve_checkpoint(checkpoint_dir, tag)
    return DeepSpeedWeightsReader(path) if layout.is_deepspeed_checkpoint(path) else CheckpointReader(path)


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | os.PathLike[str], tag: str | None = None, exclude_frozen_parameters: bool = False
) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict (every name, tied names sharing one tensor), as DeepSpeed's function.

    ``checkpoint_dir`` is the ``save_dir`` given to ``save_checkpoint`` (its ``latest`` or ``tag`` is
    used) or a tag directory, deepshard's or DeepSpeed's (ZeRO-1/2/3). This holds the whole model in
    memory; use :func:`export_safetensors` to stream it to disk instead.
    """
    reader = weights_reader(checkpoint_dir, tag)
    out = {
        name: reader.read(name, torch.float32)
        for name in reader.sources
        if not (exclude_frozen_parameters and name in reader.frozen)
    }
    for alias, target in reader.aliases.items():
        if target in out:
            out[alias] = out[target]
    return out


def load_state_dict_from_zero_checkpoint(
    model: torch.nn.Module, checkpoint_dir: str | os.PathLike[str], tag: str | None = None
) -> torch.nn.Module:
    """Load the checkpoint's fp32 weights into ``model`` (non-strictly, as DeepSpeed) and return it."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        logger.log(
            logging.WARNING,
            "loading %s into %s: missing %s, unexpected %s",
            checkpoint_dir,
            type(model).__name__,
            result.missing_keys,
            result.unexpected_keys,
        )
    return model


def export_safetensors(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tag: str | None = None,
    dtype: str | torch.dtype = "fp32",
    max_shard_size: str | int = "5GB",
    exclude_frozen_parameters: bool = False,
) -> list[Path]:
    """Stream the checkpoint's weights into HF-style safetensors files; return the files written.

    One ``model.safetensors`` when the total fits ``max_shard_size``, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. A DeepSpeed ZeRO
    checkpoint is read whole into memory first (its fp32 partitions are flat, not rows).
    """
    dtype = parse_dtype(dtype)
    reader = weights_reader(checkpoint_dir, tag)
    names = [n for n in reader.sources if not (exclude_frozen_parameters and n in reader.frozen)]
    shards = plan_shards((reader.spec(n, dtype) for n in names), parse_size(max_shard_size))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # an earlier export's files would mix with this one's
        if stale.name in (SINGLE_NAME, INDEX_NAME) or re.fullmatch(
            r"model-\d{5}-of-\d{5}\.safetensors", stale.name
        ):
            stale.unlink()
    written = []
    for shard in shards:
        path = out / shard.filename
        write_shard(path, shard, lambda spec: reader.pieces(spec.name, dtype))
        written.append(path)
    if len(shards) > 1:
        write_index(out, shards)
        written.append(out / INDEX_NAME)
    logger.info(
        "exported %d tensors from %s to %s (%d file(s))", len(names), reader.path, out, len(shards)
    )
    return written


def save_16bit_model(
    engine: Any,
    save_dir: str | os.PathLike[str],
    save_filename: str = "pytorch_model.bin",
    exclude_frozen_parameters: bool = False,
) -> bool:
    """Collective: rank 0 writes the module's weights in its training dtype (DeepSpeed's ``save_16bit_model``).

    ``*.safetensors`` names get a safetensors file (tied weights once); other names a ``torch.save``
    file of plain tensors (tied names share storage) that loads with ``weights_only=True``.
    """
    whole = None
    if getattr(engine.partition, "stage3", None) is not None:
        if not engine.config.zero_optimization.stage3_gather_16bit_weights_on_model_save:
            log_dist(
                "save_16bit_model did not save the model: at ZeRO stage 3 set "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save to true to gather the weights, "
                "or export the fp32 weights from a checkpoint (deepshard convert).",
                ranks=[0], level=logging.WARNING,
            )  # fmt: skip
            return False
        from deepshard.zero import full_state_dict

        whole = full_state_dict(engine.module, cpu=True)  # collective: one group gathered at a time
    error = None
    if _dist.rank() == 0:
        try:
            entries = module_entries(engine.module, exclude_frozen_parameters, whole)
            path = Path(save_dir) / save_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + layout.TMP_MARK + "16bit")
            if save_filename.endswith(".safetensors"):
                specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in entries.tensors.items()]
                write_shard(path, plan_shards(specs, 1 << 62)[0], lambda spec: entries.tensors[spec.name])
            else:
                state = {k: v.detach().cpu() for k, v in entries.tensors.items()}
                state.update({alias: state[target] for alias, target in entries.aliases.items()})
                torch.save(state, tmp)
                os.replace(tmp, path)
        except OSError as exc:
            error = f"save_16bit_model could not write {Path(save_dir) / save_filename}: {exc}"
    _dist.raise_if_any(error)
    return True
