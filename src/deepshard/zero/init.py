"""``zero.Init``: build a model whose large parameters are partitioned as soon as each module is complete.

Inside ``with deepshard.zero.Init(config_dict_or_path=cfg): model = GPT(...)`` every parameter of at
least ``zero_optimization.stage3_param_persistence_threshold`` elements is cut to this rank's dim-0 rows
(:class:`~deepshard.zero.layout.ShardSpec`, ``torch.chunk`` semantics over the data-parallel group) the
moment its module is assigned into its parent, i.e. right after the child's ``__init__`` returned. The
rows are kept in the ``LOCAL_ROWS`` registry (:mod:`deepshard.zero.rows`), which stage 3 adopts
as the parameter's shard, and ``param.data`` becomes a one-element NaN placeholder broadcast to the real
shape. Smaller parameters stay whole.

Mechanism, using PyTorch's public extension points only (nothing in torch is replaced):

* ``register_module_module_registration_hook`` fires when a child module is assigned into its parent:
  the child's subtree is partitioned then. ``register_module_parameter_registration_hook`` records the
  modules that own parameters, so that on exit the root's own parameters (and modules never assigned
  anywhere) are partitioned too. Both hooks are removed on exit.
* A :class:`~torch.overrides.TorchFunctionMode` watches writes that reach a partitioned parameter after
  its module was complete (a parent's ``self.apply(self._init)``, say). Random fills (``torch.nn.init.*``,
  ``normal_``, ``uniform_``, ...) *materialise* the parameter: a transient full tensor of the real shape
  takes the placeholder's place, the same operation runs on it (so the random stream advances exactly as
  in a normal construction and the values are identical), and the parameter stays whole until another
  parameter is materialised, a module is registered, or the context exits; then this rank's rows are
  kept and the full tensor is dropped. Whole overwrites (``zero_``, ``fill_``, ``copy_``, ``t[...] = x``)
  materialise too, so that init code which fills a tensor and then edits part of it (``dirac_``,
  ``sparse_``, a padding row) runs on the whole tensor. Elementwise updates (``mul_``, ``add_``,
  ``clamp_``, ``erfinv_`` ...) of a parameter that is not materialised are applied to the rows directly,
  with full-size operands cut to the same rows. While a parameter is materialised every operation on it
  is exact. Writes that cannot be reproduced on the rows (through an index or a reshaped view of a
  parameter that is not materialised, ``index_fill_``, or reading another partitioned parameter's
  values) raise an error that names the parameter.
* The construction draws from rank 0's torch generator: on entry one broadcast of its state gives every
  rank the same random stream, so every rank computes rank 0's initial values (what DeepSpeed gets with
  one broadcast per parameter), and on exit a rank that had been seeded differently gets its own
  generator back. Values of ``torch.empty`` (undefined memory, which differs between ranks) are zeros
  under the context: a model built without initialisation, as Hugging Face's ``from_pretrained`` does
  before filling it from the checkpoint, agrees on every rank too.
* Every full tensor a rank produces for a parameter (and every elementwise update applied to its rows)
  is folded into an exact integer fingerprint of the parameter. On exit one all-reduce compares the
  fingerprints of all ranks: values that still differ (randomness from another source, such as Python's
  ``random`` or NumPy seeded per rank) fail with an error instead of training a model whose rows come
  from different initialisations.
* Before ``initialize``, :class:`~deepshard.zero.GatheredParameters` over such parameters gathers their
  rows (and with ``modifier_rank`` makes that rank's writes every rank's rows):
  :mod:`deepshard.zero.init_gather`.

Memory: a rank holds its rows of the partitioned parameters (kept in the construction dtype until
exit) plus the full parameters of at most one module at a time: the module being built, whose
parameters are whole until it is assigned into its parent, or one parameter being re-initialised.
Building a model of Ψ fp32 parameters on N ranks needs about ``4Ψ/N`` bytes plus the largest module,
not ``4Ψ``. (glibc keeps freed heap memory resident, so the heap is trimmed after each whole tensor of
a MiB or more is dropped; without that the resident size would creep towards the full model's.) Each rank still *computes* every initial value (that is what keeps the random stream exact), so
construction time is that of a normal construction plus one checksum pass.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from deepshard import comm
from deepshard.zero.init_partition import FLOAT_DTYPES, InitMode, Partitioner, _collective_device

DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


class Init:
    """Partition parameters while the model is built (DeepSpeed's ``deepspeed.zero.Init``).

    As a context manager, every module constructed inside has its parameters of at least
    ``stage3_param_persistence_threshold`` elements partitioned as soon as it is assigned into its
    parent; parameters the root module owns directly are partitioned on exit. With ``module=``, an
    existing model is converted in place (its values are kept).

    Args:
        module: a model to convert now instead of (or as well as) using the context.
        data_parallel_group: the process group the rows are split over (default: the world, or
            ``mpu.get_data_parallel_group()``). It must be the group ``deepshard.initialize`` uses.
        mem_efficient_linear: accepted for compatibility; stage 3 gathers linear weights itself.
        remote_device: where this rank's rows live: ``None``/``"none"`` (where the parameter was
            created), ``"cpu"``, the accelerator's device, or ``"nvme"`` (built in host memory;
            ``initialize`` with ``offload_param.device="nvme"`` moves the rows to disk).
        pin_memory: pin host rows (on accelerators with pinned memory; a no-op on CPU).
        config_dict_or_path: a DeepSpeed config (dict, JSON path or :class:`DeepShardConfig`); only
            ``zero_optimization.stage3_param_persistence_threshold`` and ``fp16``/``bf16`` are used.
        config: DeepSpeed's older name for ``config_dict_or_path``.
        enabled: ``False`` makes this a no-op.
        dtype: the dtype parameters have on exit. Default: the config's (``bf16.enabled`` → bfloat16,
            ``fp16.enabled`` → float16), else **float32** — DeepSpeed defaults to float16 here. Values
            are computed in the construction dtype and cast on exit, so they equal a normal construction
            followed by ``model.to(dtype)``.
        mpu: a model-parallel unit; its ``get_data_parallel_group()`` is used when
            ``data_parallel_group`` is not given.

    Every rank builds rank 0's values (the construction draws from rank 0's torch generator). On exit
    one all-reduce compares a fingerprint of every partitioned parameter and raises if ranks still
    differ (randomness from a source other than torch's generator). After the context, pass the model to ``deepshard.initialize`` with ZeRO stage 3 as
    it is; do not call ``model.to()``/``half()`` on it (that would materialise whole tensors of NaN):
    ``initialize`` casts the rows itself.
    """

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        data_parallel_group: Any = None,
        mem_efficient_linear: bool = True,
        remote_device: str | torch.device | None = None,
        pin_memory: bool = False,
        config_dict_or_path: Any = None,
        config: Any = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
        mpu: Any = None,
    ) -> None:
        del mem_efficient_linear  # stage 3 gathers whole linear weights; nothing to patch
        self.enabled = enabled
        self.remote_device = _remote_device(remote_device)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"zero.Init(dtype={dtype!r}): expected one of {[str(d) for d in FLOAT_DTYPES]} or None "
                "(None: the config's bf16/fp16 setting, else torch.float32)."
            )
        if config is not None and config_dict_or_path is not None:
            raise ValueError(
                "zero.Init got both config_dict_or_path and config (its older name); pass only config_dict_or_path."
            )
        self._partitioner: Partitioner | None = None
        self._mode: InitMode | None = None
        self._handles: list[RemovableHandle] = []
        self._own_rng: torch.Tensor | None = None
        if not enabled:
            return
        group = data_parallel_group
        if group is None and mpu is not None:
            group = mpu.get_data_parallel_group()
        world = comm.get_world_size(group)
        threshold, config_dtype = _settings(config_dict_or_path if config is None else config, world)
        if dtype is None:
            dtype = config_dtype if config_dtype is not None else torch.float32
        self._partitioner = Partitioner(
            group=group,
            rank=comm.get_rank(group),
            world=world,
            threshold=threshold,
            dtype=dtype,
            remote_device=self.remote_device,
            pin_memory=pin_memory,
        )
        if module is not None:
            self._partitioner.convert(module)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Init:
        if self._partitioner is None:
            return self
        part = self._partitioner
        part.begin()
        self._handles = [
            torch.nn.modules.module.register_module_module_registration_hook(part.on_module_registered),
            torch.nn.modules.module.register_module_parameter_registration_hook(part.on_parameter_registered),
        ]
        self._own_rng = _adopt_rank0_generator(part.group, part.world)
        self._mode = InitMode(part)
        self._mode.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._partitioner is None or self._mode is None:
            return
        mode, self._mode = self._mode, None
        mode.__exit__(exc_type, exc, tb)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        own_rng, self._own_rng = self._own_rng, None
        if own_rng is not None:
            torch.set_rng_state(own_rng)
        if exc_type is None:
            self._partitioner.finish()


# ---------------------------------------------------------------------- random stream
def _adopt_rank0_generator(group: Any, world: int) -> torch.Tensor | None:
    """Collective: draw the construction from rank 0's CPU generator; this rank's own state if it differed.

    DeepSpeed gives every rank rank 0's initial values (a broadcast per parameter); the same values come
    from every rank computing them from rank 0's random stream (one broadcast of the generator state).
    Ranks seeded identically already share it and nothing changes; a rank that was not (the Hugging Face
    ``from_pretrained`` path, whose values are overwritten from the checkpoint) gets its own generator
    back on exit, so randomness after construction stays what the script set up.
    """
    if world == 1 or not comm.is_initialized():
        return None
    own = torch.get_rng_state()
    rank0 = own.to(_collective_device(group), copy=True)
    comm.broadcast(rank0, src=comm.get_global_rank(group, 0), group=group)
    rank0 = rank0.cpu()
    if torch.equal(own, rank0):
        return None
    torch.set_rng_state(rank0)
    return own


# ---------------------------------------------------------------------- arguments
def _remote_device(value: str | torch.device | None) -> torch.device | None:
    """The device rows are kept on (``None``: where each parameter was created)."""
    if value is None:
        return None
    text = str(value).lower()
    if text == "none":
        return None
    if text in ("nvme", "cpu"):
        # 'nvme': the rows are built in host memory; initialize() with offload_param.device='nvme' then
        # writes them to disk unit by unit
        return torch.device("cpu")
    from deepshard.accelerator import get_accelerator

    accel = get_accelerator().name
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in {"cpu", accel}:
        choices = sorted({"none", "cpu", accel, "nvme"})
        raise ValueError(
            f"zero.Init(remote_device={value!r}) is not a device this job can keep parameters on; "
            f"choose one of {choices} (None: where the parameters are created)."
        )
    return device


def _settings(source: Any, world: int) -> tuple[int, torch.dtype | None]:
    """(persistence threshold, dtype or None) from a DeepSpeed config; defaults without one."""
    if source is None:
        return DEFAULT_PERSISTENCE_THRESHOLD, None
    from deepshard.config import DeepShardConfig, load_config
    from deepshard.config._source import read_source
    from deepshard.precision import PrecisionPolicy

    if isinstance(source, DeepShardConfig):
        cfg = source
    else:
        data = read_source(source)
        batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu")
        if not any(data.get(k) is not None for k in batch_keys):
            # zero.Init needs no batch size; any value satisfies the batch-size check
            data = {**data, "train_micro_batch_size_per_gpu": 1}
        cfg = load_config(data, dp_world_size=world)
    threshold = int(cfg.zero_optimization.stage3_param_persistence_threshold)
    dtype = PrecisionPolicy.from_config(cfg).param_dtype if (cfg.fp16.enabled or cfg.bf16.enabled) else None
    return threshold, dtype


# ---------------------------------------------------------------------- fingerprints


__all__ = ["DEFAULT_PERSISTENCE_THRESHOLD", "Init"]
