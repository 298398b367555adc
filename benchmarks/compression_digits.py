"""Pruning + fine-tuning on a small transformer classifying sklearn's digits; sizes after ``redundancy_clean``.

The 8x8 images are 8 tokens of 8 pixels. A dense model is trained, then copies are pruned through
``compression_training`` (schedule_offset 0) and fine-tuned: 80 % sparse (l1, all encoder linears),
50 % of the heads (l1 on the output projection, q/k/v as related modules) and 50 % of the MLP rows (l1 on
fc1, fc2 related); ``redundancy_clean`` then removes what was pruned. Test accuracy on a held-out 25 %.

Usage: python benchmarks/compression_digits.py [--epochs 40] [--finetune 15]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from deepshard.compression.compress import init_compression, redundancy_clean
from deepshard.compression.scheduler import CompressionScheduler


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.query, self.key, self.value, self.output = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, -1, self.head_dim).transpose(1, 2)

        att = torch.softmax(
            split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / self.head_dim**0.5, -1
        )
        return self.output((att @ split(self.value(x))).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn, self.norm1, self.norm2 = Attention(dim, heads), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(8, dim))
        self.encoder = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        for block in self.encoder:
            h = block(h)
        return self.head(h.mean(1))


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    lr: float,
    sched: CompressionScheduler | None = None,
) -> None:
    xtr, ytr = data[0], data[1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    model.eval()
    return float((model(data[2]).argmax(-1) == data[3]).float().mean())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("_scores"))


def nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if not n.endswith("_scores"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--finetune", type=int, default=15)
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(x))
    data = (x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]])
    dense = DigitsTransformer()
    train(dense, data, args.epochs, 2e-3)
    base = accuracy(dense, data)
    print(f"dense: test accuracy {100 * base:.2f} %, {n_params(dense)} parameters")

    lin = r"encoder\.\d+\.(attn\.(query|key|value|output)|fc1|fc2)$"
    configs = {
        "80 % sparse (l1)": {
            "sparse_pruning": {
                "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
                "different_groups": {"sp": {"params": {"dense_ratio": 0.2}, "modules": [lin]}},
            }
        },
        "50 % heads removed (l1)": {
            "head_pruning": {
                "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0, "num_heads": 8},
                "different_groups": {
                    "hp": {
                        "params": {"dense_ratio": 0.5},
                        "modules": [r"attn\.output"],
                        "related_modules": [[r"attn\.query", r"attn\.key", r"attn\.value"]],
                    }
                },
            }
        },
        "50 % MLP rows removed (l1)": {
            "row_pruning": {
                "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
                "different_groups": {
                    "rp": {"params": {"dense_ratio": 0.5}, "modules": [r"fc1"], "related_modules": [[r"fc2"]]}
                },
            }
        },
    }
    for name, section in configs.items():
        cfg = {"compression_training": section}
        model = copy.deepcopy(dense)
        init_compression(model, cfg)
        sched = CompressionScheduler(model, cfg)
        pruned_acc = accuracy(model, data)
        train(model, data, args.finetune, 5e-4, sched)
        tuned = accuracy(model, data)
        before = n_params(model)
        redundancy_clean(model, cfg)
        cleaned = accuracy(model, data)
        print(
            f"{name:28s}: accuracy pruned {100 * pruned_acc:.2f} %, fine-tuned {100 * tuned:.2f} % "
            f"({100 * (tuned - base):+.2f} points vs dense), after redundancy_clean {100 * cleaned:.2f} %; "
            f"parameters {before} -> {n_params(model)} ({100 * (1 - n_params(model) / before):.1f} % fewer), "
            f"non-zero {nonzero(model)}"
        )


if __name__ == "__main__":
    main()
