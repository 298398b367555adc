"""Master weights: the tensors the optimizer actually steps, possibly this rank's shards only.

* fp32 parameters, unsharded (stage 0): the masters *are* the parameters; every call is a no-op.
* bf16/fp16 parameters, unsharded: one fp32 copy per parameter; after the step the copies are cast
  back into the module in one multi-tensor copy.
* sharded (stages 1-3): each rank keeps fp32 masters of its dim-0 rows only (see
  :mod:`deepshard.zero.layout`). With fp32 parameters the master is a view of the parameter's own
  rows (no extra memory); the updated rows of every rank are then all-gathered by the ZeRO layer.

The optimizer's ``param_groups`` are pointed at the masters (hyper-parameters are kept).
Memory: 4 bytes per master element, plus the optimizer state on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``(rows, *rest)`` with a 0-d tensor seen as one row."""
    return tensor.view(1) if tensor.dim() == 0 else tensor


class MasterWeights:
    """Pairs each trainable parameter with the tensor the optimizer steps for it on this rank.

    ``row_range(p)`` gives the ``[start, end)`` dim-0 rows this rank owns, or ``None`` to own the
    whole parameter.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        needs_fp32_copy: bool,
        row_range: Callable[[torch.Tensor], tuple[int, int]] | None = None,
        shards: Mapping[int, torch.Tensor] | None = None,
        device: torch.device | None = None,
        pin_memory: bool = False,
        sink: Callable[[int, torch.Tensor], None] | None = None,
        published_early: bool = False,
    ) -> None:
        """``device``: where fp32 copies live (default: with their parameter; the host for optimizer
        offload, page-locked with ``pin_memory``). ``sink(i, master)`` is called as each master is
        made, so that an offload tier can take it away before the next one exists.
        ``published_early``: each step writes its updated masters into the model itself (offload), so
        the casts after the step are skipped and updated rows are read from the parameters."""
        self.params: list[torch.Tensor] = list(params)
        self.needs_fp32_copy = needs_fp32_copy
        self.sharded = row_range is not None
        self.ranges: list[tuple[int, int] | None] = [row_range(p) if row_range else None for p in self.params]
        # ZeRO-3: this rank's rows live in a shard tensor of their own, not in the parameter
        self.shards: dict[int, torch.Tensor] = dict(shards or {})
        self.masters: list[torch.Tensor] = []
        self.published_early = published_early
        for i, (p, rows) in enumerate(zip(self.params, self.ranges)):
            if id(p) in self.shards:
                local = self.shards[id(p)]
            else:
                local = p.detach() if rows is None else as_rows(p.detach())[rows[0] : rows[1]]
            if needs_fp32_copy:
                copy = local.to(device=device or local.device, dtype=torch.float32, copy=True)
                if pin_memory and copy.device.type == "cpu" and torch.cuda.is_available():
                    copy = copy.pin_memory()
                self.masters.append(torch.nn.Parameter(copy, requires_grad=p.requires_grad))
            elif rows is None:
                self.masters.append(p)
            else:
                # fp32 shard: a view of the parameter's own rows, stepped in place
                self.masters.append(torch.nn.Parameter(local, requires_grad=p.requires_grad))
            if sink is not None:
                sink(i, self.masters[-1])
        self._by_param = {id(p): m for p, m in zip(self.params, self.masters)}
        self._range_of = {id(p): r for p, r in zip(self.params, self.ranges)}

    def range_of(self, param: torch.Tensor) -> tuple[int, int] | None:
        """The dim-0 rows of ``param`` this rank's master holds (``None``: the whole parameter)."""
        return self._range_of[id(param)]

    @property
    def identity(self) -> bool:
        """Whether the masters are the module's parameters themselves."""
        return not (self.needs_fp32_copy or self.sharded)

    def master_of(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer updates for ``param``."""
        return self._by_param[id(param)]

    def masters_of(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The masters of ``params``, in order."""
        return [self._by_param[id(p)] for p in params]

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Point ``optimizer`` at the masters instead of the module parameters."""
        if self.identity:
            return
        if optimizer.state:
            raise ValueError(
                "the optimizer already holds state; deepshard steps fp32 master copies (bf16/fp16) or shards "
                "(ZeRO stages 1-3), so pass an optimizer that has not stepped yet."
            )
        for group in optimizer.param_groups:
            try:
                group["params"] = [self._by_param[id(p)] for p in group["params"]]
            except KeyError:
                raise ValueError(
                    "the optimizer holds a tensor that is not a trainable parameter of the model; build it from "
                    "model.parameters() (or pass model_parameters=) so deepshard can map it to its master copy."
                ) from None

    def attach_grads(
        self,
        grads: Mapping[int, torch.Tensor],
        indices: Sequence[int] | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        """Give each master (or those at ``indices``) its gradient from ``grads[id(param)]``: whole or
        shard, viewed or cast to fp32 on the master's device (into consecutive views of the flat fp32
        ``out`` when given, so that a reused buffer replaces fresh allocations).

        A whole gradient is sliced to this rank's rows; one already shaped like the master is its shard.
        """
        if self.identity:
            return
        offset = 0
        for i in range(len(self.params)) if indices is None else indices:
            p, m, rows = self.params[i], self.masters[i], self.ranges[i]
            grad = grads.get(id(p))
            if grad is None:
                m.grad = None
                continue
            if rows is not None and grad.shape != m.shape:
                grad = as_rows(grad)[rows[0] : rows[1]]
            if out is not None and (grad.dtype != torch.float32 or grad.device != m.device):
                view = out[offset : offset + m.numel()].view(m.shape)
                offset += m.numel()
                view.copy_(grad.view(m.shape))
                m.grad = view
            else:
                m.grad = grad.to(device=m.device, dtype=torch.float32).view(m.shape)

    def release_grads(self, indices: Sequence[int] | None = None) -> None:
        """Drop master gradients (views stay valid in their buffers; fp32 cast copies are freed)."""
        if not self.identity:
            for i in range(len(self.masters)) if indices is None else indices:
                self.masters[i].grad = None

    @torch.no_grad()
    def publish_rows(
        self,
        indices: Sequence[int],
        before: Callable[[torch.Tensor], None] | None = None,
        after: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Write the masters at ``indices`` into this rank's rows of their parameters (or ZeRO-3 shards).

        ``before(param)`` / ``after(param)`` bracket each write (an offloaded shard is made resident,
        then written back once all its members are done).
        """
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for i in indices:
            p, m, rows = self.params[i], self.masters[i], self.ranges[i]
            if before is not None:
                before(p)
            if id(p) in self.shards:
                target = self.shards[id(p)]
            else:
                target = p.data if rows is None else as_rows(p.data)[rows[0] : rows[1]]
            if target.numel():
                dst.append(target)
                src.append(m.detach().view(target.shape))
        if dst:
            torch._foreach_copy_(dst, src)
        if after is not None:
            for i in indices:
                after(self.params[i])

    def publish_source(self, param: torch.Tensor) -> torch.Tensor:
        """What the all-gather of updated rows reads for ``param``: its master, or its own rows once published."""
        if not self.published_early:
            return self._by_param[id(param)]
        rows = self._range_of[id(param)]
        return param.data if rows is None else as_rows(param.data)[rows[0] : rows[1]]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Cast updated unsharded masters into the module (sharded masters are all-gathered instead)."""
        if self.needs_fp32_copy and not self.sharded and self.params and not self.published_early:
            torch._foreach_copy_(self.params, self.masters)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Refresh masters from the module (after its weights were loaded or broadcast)."""
        if not self.needs_fp32_copy:
            return
        for p, m, rows in zip(self.params, self.masters, self.ranges):
            if id(p) in self.shards:
                m.copy_(self.shards[id(p)])
            else:
                m.copy_(p if rows is None else as_rows(p)[rows[0] : rows[1]])

    @torch.no_grad()
    def copy_to_shards(self) -> None:
        """Cast updated masters into their ZeRO-3 shard tensors (fp32 masters are those tensors)."""
        if self.needs_fp32_copy and self.shards and not self.published_early:
            pairs = [(self.shards[id(p)], m) for p, m in zip(self.params, self.masters) if id(p) in self.shards]
            torch._foreach_copy_([s for s, _ in pairs], [m.view(s.shape) for s, m in pairs])

    @property
    def nbytes(self) -> int:
        """Bytes held by master copies (0 when masters are the parameters or views of them)."""
        return sum(m.numel() * m.element_size() for m in self.masters) if self.needs_fp32_copy else 0
