"""MiniLM-L6 -> 3 layers (``layer_reduction``, teacher layers 1, 3, 5) with and without distillation.

The student is initialised by ``init_compression(..., teacher_model=)``; "without KD" is that student as is,
"with KD" trains it to match the teacher's mean-pooled sentence embeddings (cosine) and its hidden states
at the copied layers (``distill.hidden_loss``) on stdlib docstring sentences; both are scored on held-out
sentences by the cosine to the teacher's embeddings.

Usage: python benchmarks/compression_minilm_kd.py [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compression_minilm import model_dir, stdlib_sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoTokenizer, BertModel

    from deepshard.compression.compress import init_compression
    from deepshard.compression.distill import hidden_loss

    torch.manual_seed(0)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    teacher = BertModel.from_pretrained(str(path), dtype=torch.float32).eval()
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = 3
    student = BertModel(cfg)
    init_compression(
        student,
        {
            "compression_training": {
                "layer_reduction": {
                    "enabled": True,
                    "keep_number_layer": 3,
                    "module_name_prefix": "encoder.layer",
                    "teacher_layer": [1, 3, 5],
                    "other_module_name": ["embeddings", "pooler"],
                }
            }
        },
        teacher_model=teacher,
    )
    sents = stdlib_sentences()
    evals, train = sents[::4][: args.eval], [s for i, s in enumerate(sents) if i % 4]

    def encode(model: BertModel, texts: list[str], hidden: bool = False):  # type: ignore[no-untyped-def]
        b = tok(texts, padding=True, return_tensors="pt")
        out = model(**b, output_hidden_states=hidden)
        m = b["attention_mask"][..., None].float()
        emb = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
        return emb, out.hidden_states

    @torch.no_grad()
    def score(model: BertModel) -> float:
        model.eval()
        cos = [
            (encode(model, evals[i : i + 32])[0] * encode(teacher, evals[i : i + 32])[0]).sum(-1)
            for i in range(0, len(evals), 32)
        ]
        return float(torch.cat(cos).mean())

    print(f"held-out cosine to the 6-layer teacher, 3-layer student without KD: {score(student):.4f}")
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        student.train()
        idx = torch.randint(0, len(train), (args.batch,), generator=g).tolist()
        texts = [train[i] for i in idx]
        with torch.no_grad():
            t_emb, t_hid = encode(teacher, texts, hidden=True)
        s_emb, s_hid = encode(student, texts, hidden=True)
        loss = (1 - (s_emb * t_emb).sum(-1)).mean() + hidden_loss(
            list(s_hid[1:]), [t_hid[2], t_hid[4], t_hid[6]]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
    print(
        f"held-out cosine to the 6-layer teacher, 3-layer student with KD ({args.steps} steps): {score(student):.4f}"
    )


if __name__ == "__main__":
    main()
