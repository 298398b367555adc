"""Knowledge-distillation losses for layer reduction (a shallow student learning from its teacher).

``kd_loss`` is Hinton's soft-target loss: ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``,
averaged over the leading (batch/token) dims; the ``T**2`` keeps its gradient scale independent of ``T``.
``hidden_loss`` is the mean squared error between paired hidden states (the layer-wise, TinyBERT-style term
that ZeroQuant's LKD also uses), for representations rather than logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Soft-target distillation loss over the last dim; ``teacher_logits`` receive no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be positive.")
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * t * t


def hidden_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of the MSE between student and (detached) teacher hidden states of equal shape."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"hidden_loss pairs {len(student_hidden)} student with {len(teacher_hidden)} teacher states; "
            "give the same non-zero number of each."
        )
    losses = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()
