"""fp32 master weights: the copies the optimizer updates when the module runs in bf16/fp16.

With fp32 parameters the "masters" are the parameters themselves and every call here is a no-op, so
the engine has one code path. With low-precision parameters, each trainable parameter gets an fp32
copy; the optimizer's ``param_groups`` are pointed at the copies (its hyper-parameters are kept), and
after each step the copies are cast back into the module in one multi-tensor copy.
Memory: 4 bytes per parameter for the copy, plus the optimizer's state on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class MasterWeights:
    """Pairs each trainable module parameter with the tensor the optimizer steps."""

    def __init__(self, params: Sequence[torch.nn.Parameter], enabled: bool) -> None:
        self.enabled = enabled
        self.params: list[torch.Tensor] = list(params)
        if enabled:
            self.masters: list[torch.Tensor] = [
                torch.nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad) for p in self.params
            ]
        else:
            self.masters = list(self.params)
        self._by_param = {id(p): m for p, m in zip(self.params, self.masters)}

    def master_of(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer updates for ``param``."""
        return self._by_param[id(param)]

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Point ``optimizer`` at the masters instead of the module parameters."""
        if not self.enabled:
            return
        if optimizer.state:
            raise ValueError(
                "the optimizer already holds state; with bf16/fp16 deepshard steps fp32 master copies, so pass "
                "an optimizer that has not stepped yet."
            )
        for group in optimizer.param_groups:
            try:
                group["params"] = [self._by_param[id(p)] for p in group["params"]]
            except KeyError:
                raise ValueError(
                    "the optimizer holds a tensor that is not a parameter of the model; build it from "
                    "model.parameters() (or pass model_parameters=) so deepshard can map it to its master copy."
                ) from None

    def attach_grads(self, grad_views: Mapping[int, torch.Tensor]) -> None:
        """Give each master its gradient: the fp32 bucket view itself, or an fp32 copy of it."""
        if not self.enabled:
            return
        for p, m in zip(self.params, self.masters):
            view = grad_views.get(id(p))
            if view is None:
                m.grad = None
            elif view.dtype == torch.float32:
                m.grad = view
            else:
                m.grad = view.to(torch.float32)

    def release_grads(self) -> None:
        """Drop fp32 gradient copies made by :meth:`attach_grads` (fp32 views stay bound)."""
        if not self.enabled:
            return
        for m in self.masters:
            if m.grad is not None and m.grad._base is None:
                m.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Cast the updated masters into the module's parameters."""
        if self.enabled and self.params:
            torch._foreach_copy_(self.params, self.masters)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Refresh the masters from the module (after the module's weights were loaded or broadcast)."""
        if self.enabled and self.params:
            torch._foreach_copy_(self.masters, self.params)

    @property
    def nbytes(self) -> int:
        """Bytes held by master copies (0 when the masters are the parameters)."""
        return sum(m.numel() * m.element_size() for m in self.masters) if self.enabled else 0
