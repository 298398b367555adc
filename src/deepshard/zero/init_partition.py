"""The machinery behind :class:`deepshard.zero.Init`: partitioning modules as they are built, replaying
later re-initialisations exactly (a ``TorchFunctionMode``), and the cross-rank fingerprints.

See :mod:`deepshard.zero.init` for the mechanism and its guarantees.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from deepshard import comm
from deepshard.comm.host_shm import release_freed_heap
from deepshard.precision.master import as_rows
from deepshard.zero.init_fingerprint import fold, scalar_digest, tensor_digest
from deepshard.zero.init_gather import remember
from deepshard.zero.init_ops import (
    CONVERSIONS,
    ZeroInitError,
    classify,
    covers_all,
    op_tensors,
    read_error,
    same_or,
    write_error,
)
from deepshard.zero.layout import ShardSpec
from deepshard.zero.rows import LOCAL_ROWS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TRIM_BYTES = 1 << 20  # give the heap back to the OS after dropping a whole tensor this large


def _storage_key(tensor: torch.Tensor) -> int | None:
    """Address of the tensor's storage (``None`` for tensors without one)."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


# ---------------------------------------------------------------------- partitioning
class _Entry:
    """One partitioned parameter: its placeholder, its rows' range and its fingerprint."""

    __slots__ = ("base", "end", "fingerprint", "name", "ref", "shape", "start")

    def __init__(self, param: torch.nn.Parameter, name: str) -> None:
        self.ref = weakref.ref(param)
        self.name = name
        self.shape = tuple(param.shape)
        self.base = _nan(param.dtype, param.device)  # one element of its own: its address names the param
        self.start = self.end = 0
        self.fingerprint = 0

    def placeholder(self) -> torch.Tensor:
        return self.base.expand(self.shape) if self.shape else self.base.view(())

    def describe(self) -> str:
        return f"'{self.name}' (shape {list(self.shape)})"


def _nan(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full((1,), fill, dtype=dtype, device=device)


class Partitioner:
    """The state of one ``zero.Init``: partitioned parameters, materialised ones, and their fingerprints."""

    def __init__(
        self,
        group: Any,
        rank: int,
        world: int,
        threshold: int,
        dtype: torch.dtype,
        remote_device: torch.device | None,
        pin_memory: bool,
    ) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.threshold = threshold
        self.dtype = dtype
        self.remote_device = remote_device
        self.pin_memory = pin_memory
        self.entries: list[_Entry] = []
        self.by_key: dict[int, _Entry] = {}  # placeholder storage address -> entry
        self.materialised: dict[int, _Entry] = {}  # id(entry) -> entry, parameters whole right now
        self.pending: dict[int, tuple[_Entry, torch.Tensor]] = {}  # converted placeholders, see convert_op
        self.owners: dict[int, weakref.ref[torch.nn.Module]] = {}  # modules that registered parameters
        self.bypass = False  # our own tensor code runs under the mode: let it through
        self.thread = threading.get_ident()

    # -------------------------------------------------------------- lifecycle
    def begin(self) -> None:
        self.thread = threading.get_ident()

    def convert(self, module: torch.nn.Module) -> None:
        """``Init(module=...)``: partition an existing model now (collective)."""
        self.bypass = True
        try:
            for name, p in module.named_parameters():
                self.partition(p, name)
            self.verify()
            self.finalise(module.parameters())
        finally:
            self.bypass = False

    def finish(self) -> None:
        """Context exit: partition what is left, compare fingerprints (collective), cast to the dtype."""
        self.bypass = True
        try:
            self.settle_all()
            modules = [m for m in (ref() for ref in self.owners.values()) if m is not None]
            for m in modules:
                for name, p in m.named_parameters(recurse=False):
                    self.partition(p, f"{type(m).__name__}.{name}")
            self.settle_all(scan=True)
            self.verify()
            self.finalise(p for m in modules for p in m.parameters(recurse=False))
        finally:
            self.bypass = False
            self.pending.clear()
            self.owners.clear()

    # -------------------------------------------------------------- hooks
    def on_module_registered(self, parent: torch.nn.Module, name: str, child: Any) -> None:
        """A child's ``__init__`` is over: partition its subtree."""
        if self.bypass or child is None or threading.get_ident() != self.thread:
            return

        def partition_subtree() -> None:
            self.settle_all()
            for pname, p in child.named_parameters():
                self.partition(p, f"{type(parent).__name__}.{name}.{pname}")

        self.bypass = True
        try:
            # run under the mode's own dispatch, which pops the mode: our tensor code is not routed through it
            torch.overrides.handle_torch_function(partition_subtree, ())
        finally:
            self.bypass = False

    def on_parameter_registered(self, module: torch.nn.Module, name: str, param: Any) -> None:
        if self.bypass or param is None or threading.get_ident() != self.thread:
            return
        self.owners.setdefault(id(module), weakref.ref(module))

    # -------------------------------------------------------------- partition / materialise
    def partition(self, p: torch.nn.Parameter, name: str) -> None:
        """Keep this rank's rows of ``p`` and give it a placeholder (no-op for small or done params)."""
        if p in LOCAL_ROWS or p.numel() < self.threshold or p.is_meta:
            return
        entry = _Entry(p, name)
        self.entries.append(entry)
        self.by_key[_storage_key(entry.base) or 0] = entry
        self.settle(entry)

    def is_materialised(self, entry: _Entry) -> bool:
        p = entry.ref()
        return p is not None and _storage_key(p) != _storage_key(entry.base)

    def settle(self, entry: _Entry) -> None:
        """Take this rank's rows of the parameter's whole value; the whole value is dropped."""
        self.materialised.pop(id(entry), None)
        p = entry.ref()
        if p is None or not self.is_materialised(entry):
            return
        full = p.data
        if (
            tuple(full.shape) != entry.shape
            or full.dtype != entry.base.dtype
            or full.device != entry.base.device
        ):
            # the user assigned .data of another shape / dtype / device: partition that
            self.by_key.pop(_storage_key(entry.base) or 0, None)
            entry.shape = tuple(full.shape)
            entry.base = _nan(full.dtype, full.device)
            self.by_key[_storage_key(entry.base) or 0] = entry
        entry.start, entry.end = ShardSpec(torch.Size(entry.shape), self.world).row_range(self.rank)
        entry.fingerprint = fold(entry.fingerprint, tensor_digest(full))
        rows = as_rows(full)[entry.start : entry.end]
        device = self.remote_device or full.device
        rows = rows.to(device=device, copy=True).contiguous()
        LOCAL_ROWS.set(p, rows)
        p.data = entry.placeholder()
        nbytes = full.numel() * full.element_size()
        del full, rows
        if nbytes >= _TRIM_BYTES:
            release_freed_heap()

    def settle_all(self, scan: bool = False) -> None:
        """Settle the materialised parameters; ``scan``: also any whose ``.data`` was replaced unseen."""
        for entry in list(self.materialised.values()):
            self.settle(entry)
        if scan:
            for entry in self.entries:
                if self.is_materialised(entry):
                    self.settle(entry)

    def materialise(self, entry: _Entry, keep: Iterable[_Entry]) -> None:
        """Give the parameter a whole tensor of its real shape (contents undefined: it is about to be filled).

        Other materialised parameters, except those in ``keep`` (used by the same operation), are
        settled first, so at most one operation's parameters are whole at a time.
        """
        kept = {id(e) for e in keep}
        for other in list(self.materialised.values()):
            if id(other) not in kept:
                self.settle(other)
        p = entry.ref()
        assert p is not None
        p.data = torch.empty(entry.shape, dtype=entry.base.dtype, device=entry.base.device)
        self.materialised[id(entry)] = entry

    def rows_of(self, entry: _Entry) -> torch.Tensor:
        p = entry.ref()
        assert p is not None
        rows = LOCAL_ROWS.get(p)
        assert rows is not None, "a parameter zero.Init did not partition"
        return rows

    # -------------------------------------------------------------- exit
    def verify(self) -> None:
        """One all-reduce: every rank must have built the same partitioned values (collective)."""
        if self.world == 1 or not comm.is_initialized():
            return
        combined = 0
        for entry in self.entries:
            combined = fold(combined, entry.fingerprint)
        n = len(self.entries)
        device = _collective_device(self.group)
        seen = torch.tensor([n, -n, combined, -combined], dtype=torch.int64, device=device)
        comm.all_reduce(seen, op=comm.ReduceOp.MAX, group=self.group)
        most, least = int(seen[0]), -int(seen[1])
        if most != least:
            raise ZeroInitError(
                "zero.Init: ranks built different models: they partitioned between "
                f"{least} and {most} parameters (this rank: {n}). Every rank must construct the same model."
            )
        if int(seen[2]) == -int(seen[3]):
            return
        # some parameter differs: find the first one (all ranks take this branch together)
        mine = torch.tensor([e.fingerprint for e in self.entries], dtype=torch.int64, device=device)
        every = torch.empty(self.world * n, dtype=torch.int64, device=device)
        comm.all_gather_into_tensor(every, mine, group=self.group)
        table = every.view(self.world, n).cpu()
        differs = (table != table[0]).any(dim=0).nonzero().flatten().tolist()
        first = self.entries[differs[0]]
        groups: dict[int, list[int]] = {}
        for q in range(self.world):
            groups.setdefault(int(table[q, differs[0]]), []).append(q)
        raise ZeroInitError(
            "zero.Init: ranks built different initial values, although the construction draws from rank 0's "
            "torch generator: the difference comes from another source of randomness (seed Python's random "
            f"and NumPy identically on every rank). {len(differs)} of {n} partitioned parameters differ, the first being "
            f"{first.describe()}; ranks with equal values: {sorted(groups.values())}."
        )

    def finalise(self, whole: Iterable[torch.nn.Parameter]) -> None:
        """Cast rows (and the whole parameters built here) to the target dtype; pin host rows."""
        from deepshard.accelerator import get_accelerator

        accel = get_accelerator()
        for entry in self.entries:
            p = entry.ref()
            if p is None:
                continue
            rows = self.rows_of(entry)
            if rows.is_floating_point() and rows.dtype != self.dtype:
                rows = rows.to(self.dtype)
                entry.base = _nan(self.dtype, entry.base.device)
                p.data = entry.placeholder()
            if self.pin_memory and rows.device.type == "cpu":
                rows = accel.pin_memory(rows)
            LOCAL_ROWS.set(p, rows)
            remember(p, self.group)
        for p in whole:
            if p not in LOCAL_ROWS and p.is_floating_point() and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
        self.materialised.clear()
        self.by_key.clear()

    # -------------------------------------------------------------- operations (the mode)
    def find(self, tensor: Any) -> _Entry | None:
        """The live partitioned parameter whose placeholder ``tensor`` aliases."""
        if not isinstance(tensor, torch.Tensor):
            return None
        key = _storage_key(tensor)
        entry = self.by_key.get(key) if key is not None else None
        if entry is None or entry.ref() is None:
            return None
        return entry

    def substitute(self, value: Any) -> Any:
        """``value`` with every whole-shape alias of a materialised parameter replaced by its whole tensor."""
        if isinstance(value, torch.Tensor):
            entry = self.find(value)
            if entry is not None and tuple(value.shape) == entry.shape and self.is_materialised(entry):
                p = entry.ref()
                assert p is not None
                return p.data
            return value
        if isinstance(value, list | tuple):
            return type(value)(self.substitute(v) for v in value)
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def handle(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hits = [(t, e) for t in op_tensors(args, kwargs) if (e := self.find(t)) is not None]
        if not hits:
            out = func(*args, **kwargs)
            if func in _UNINITIALISED and isinstance(out, torch.Tensor):
                # undefined memory differs between ranks; a model built without initialisation (Hugging
                # Face's from_pretrained fills it from the checkpoint afterwards) must agree all the same
                out.zero_()
            return out
        name = getattr(func, "__name__", "")
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        if name == "__set__" and owner == "data":
            return self.assign_data(func, args, hits)
        target, kind = classify(func, name, args, kwargs)
        if kind is None:
            if name in CONVERSIONS and args and (entry := self.find(args[0])) is not None:
                return self.convert_op(func, entry, args, kwargs)
            return func(*self.substitute(args), **self.substitute(kwargs))
        entry = self.find(target)
        for t, e in hits:
            if t is not target and (tuple(t.shape) != e.shape or not self.is_materialised(e)):
                raise read_error(e.describe(), name)
        if entry is None:  # writes into an ordinary tensor, reading materialised parameters only
            return func(*self.substitute(args), **self.substitute(kwargs))
        if tuple(target.shape) != entry.shape:  # a view made before the parameter was whole, or a part of it
            raise write_error(entry.describe(), name, whole=False)
        if self.is_materialised(entry):
            return same_or(func(*self.substitute(args), **self.substitute(kwargs)), target)
        if kind == "unsupported":
            raise write_error(entry.describe(), name, whole=True)
        if kind == "setitem" and not covers_all(args[1]):
            raise write_error(entry.describe(), name, whole=False)
        if kind in ("fill", "setitem"):
            self.materialise(entry, keep=[e for _, e in hits])
            return same_or(func(*self.substitute(args), **self.substitute(kwargs)), target)
        return self.rows_op(func, name, entry, args, kwargs)

    def rows_op(
        self,
        func: Callable[..., Any],
        name: str,
        entry: _Entry,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """An elementwise in-place update of a partitioned parameter, applied to this rank's rows."""
        rows = self.rows_of(entry)
        digest = fold(0, zlib.crc32(name.encode()))
        operands: list[Any] = []
        for value in (*args[1:], *kwargs.values()):
            value = self.substitute(value)
            if isinstance(value, torch.Tensor):
                digest = fold(digest, tensor_digest(value))
            elif (number := scalar_digest(value)) is not None:
                digest = fold(digest, number)
            operands.append(value)
        sliced = [self.rows_operand(v, entry) for v in operands]
        func(rows, *sliced[: len(args) - 1], **dict(zip(kwargs, sliced[len(args) - 1 :])))
        entry.fingerprint = fold(entry.fingerprint, digest)
        return args[0]

    def rows_operand(self, value: Any, entry: _Entry) -> Any:
        """A full-shape operand of an elementwise update, cut to this rank's rows (broadcasts pass)."""
        shape = entry.shape
        if (
            isinstance(value, torch.Tensor)
            and len(shape) > 0
            and value.dim() == len(shape)
            and value.shape[0] == shape[0]
            and shape[0] != 1
        ):
            return value[entry.start : entry.end]
        return value

    def convert_op(
        self, func: Callable[..., Any], entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``.to()`` / ``.half()`` ... of a partitioned parameter: a converted placeholder, not NaN bytes.

        When ``Module._apply`` then assigns it to ``param.data``, :meth:`assign_data` converts the rows.
        """
        if self.is_materialised(entry) or tuple(args[0].shape) != entry.shape:
            return func(*self.substitute(args), **self.substitute(kwargs))
        one = func(entry.base, *args[1:], **kwargs)
        if not isinstance(one, torch.Tensor) or _storage_key(one) == _storage_key(entry.base):
            return func(*args, **kwargs)  # no conversion: the same alias
        base = _nan(one.dtype, one.device)
        self.pending[_storage_key(base) or 0] = (entry, base)
        return base.expand(entry.shape) if entry.shape else base.view(())

    def assign_data(self, func: Callable[..., Any], args: tuple[Any, ...], hits: list[Any]) -> Any:
        """``param.data = value`` where the parameter or the value is partitioned."""
        param, value = args[0], args[1]
        entry = self.find(param)
        converted = self.pending.get(_storage_key(value) or -1) if isinstance(value, torch.Tensor) else None
        if entry is not None and converted is not None and converted[0] is entry:
            base = converted[1]
            rows = self.rows_of(entry)
            device = self.remote_device or base.device
            LOCAL_ROWS.set(param, rows.to(device=device, dtype=base.dtype))
            self.by_key.pop(_storage_key(entry.base) or 0, None)
            entry.base = base
            self.by_key[_storage_key(base) or 0] = entry
            func(param, entry.placeholder())
            return None
        for t, e in hits:
            if t is value:
                raise read_error(e.describe(), "assignment to .data")
        func(*args)
        if entry is not None:
            self.materialised[id(entry)] = entry  # whole again, with the user's values
        return None


_UNINITIALISED = frozenset({torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty})
"""Allocators whose values are undefined: under ``zero.Init`` they return zeros (a valid undefined value)."""


def _collective_device(group: Any) -> torch.device:
    backend = comm.get_backend(group) or "gloo"
    if "nccl" in backend:
        from deepshard.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")


class InitMode(TorchFunctionMode):
    """Routes every torch call made inside ``zero.Init`` past the partitioner (see the module docstring)."""

    def __init__(self, partitioner: Partitioner) -> None:
        super().__init__()
        self.partitioner = partitioner

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        part = self.partitioner
        if part.bypass or threading.get_ident() != part.thread:
            return func(*args, **kwargs)
        part.bypass = True
        try:
            return part.handle(func, args, kwargs)
        finally:
            part.bypass = False
