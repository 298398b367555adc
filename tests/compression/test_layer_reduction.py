"""Layer reduction: student_initialization from chosen teacher layers, and the distillation losses."""

from __future__ import annotations

import pytest
import torch
from compress_models import TinyTransformer

from deepshard.compression.compress import init_compression, student_initialization
from deepshard.compression.distill import hidden_loss, kd_loss


def _cfg(**extra: object) -> dict:
    return {
        "compression_training": {
            "layer_reduction": {
                "enabled": True,
                "keep_number_layer": 2,
                "module_name_prefix": "layers",
                "teacher_layer": [1, 3],
                "other_module_name": ["embed", "head"],
                **extra,
            }
        }
    }


def test_student_copies_the_chosen_teacher_layers() -> None:
    torch.manual_seed(0)
    teacher, student = TinyTransformer(layers=4), TinyTransformer(layers=2)
    init_compression(student, _cfg(), teacher_model=teacher)
    for s, t in (
        (student.layers[0], teacher.layers[1]),
        (student.layers[1], teacher.layers[3]),
        (student.embed, teacher.embed),
        (student.head, teacher.head),
    ):
        for ps, pt in zip(s.parameters(), t.parameters()):
            assert torch.equal(ps, pt)
    # the student computes the teacher with layers 0 and 2 removed
    ids = torch.randint(0, 32, (2, 5))
    del teacher.layers[2], teacher.layers[0]
    assert torch.allclose(student(ids), teacher(ids))


def test_layer_reduction_errors() -> None:
    with pytest.raises(ValueError, match="teacher_model"):
        init_compression(TinyTransformer(layers=2), _cfg())
    with pytest.raises(ValueError, match="keep_number_layer=3 but teacher_layer lists 2"):
        student_initialization(
            TinyTransformer(layers=2), TinyTransformer(layers=4), _cfg(keep_number_layer=3)
        )
    with pytest.raises(ValueError, match="different parameter shapes"):
        student_initialization(TinyTransformer(layers=2, dim=8), TinyTransformer(layers=4), _cfg())


def test_kd_losses() -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 7)
    s = torch.randn(4, 7, requires_grad=True)
    assert kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    loss = kd_loss(s, t, 2.0)
    ref = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean"
        )
        * 4
    )
    assert torch.allclose(loss, ref)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert hidden_loss([t], [t]).item() == 0.0
