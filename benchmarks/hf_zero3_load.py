"""Peak memory per rank of transformers' ``from_pretrained`` under ZeRO-3 (HfDeepSpeedConfig alive), 2 ranks.

Builds a random-weight Llama of about 134M parameters (vocab 32000, width 768, 12 layers; no download),
saves it as safetensors, then on 2 gloo ranks (through ``deepshard --as_deepspeed on``) loads it with
``from_pretrained`` while a DeepSpeed ZeRO-3 config is alive: the model is built partitioned by
``zero.Init`` and rank 0 copies each module's tensors in under ``GatheredParameters(modifier_rank=0)``.
A sampling thread records the peak anonymous (private) resident memory and the peak total resident
memory (which also counts the pages of the memory-mapped checkpoint file rank 0 reads) above each
rank's level before loading, reported against the full fp32 model's bytes:

    python benchmarks/hf_zero3_load.py            # also: --width 1024 --layers 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def rank_main(path: str) -> None:
    import deepspeed  # deepshard, through the launcher's alias
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()
    peak = {"RssAnon": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _status()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.002)

    base = _status()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - transformers holds it weakly: it must stay alive
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    full = sum(p.numel() for p in model.parameters()) * 4
    anon, rss = peak["RssAnon"] - base["RssAnon"], peak["VmRSS"] - base["VmRSS"]
    print(
        f"rank {deepspeed.comm.get_rank()}: full fp32 model {full / 2**20:.0f} MiB; load peak: private "
        f"+{anon / 2**20:.0f} MiB ({anon / full:.2f}x), resident incl. file pages +{rss / 2**20:.0f} MiB "
        f"({rss / full:.2f}x); {seconds:.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                         num_key_value_heads=args.width // 64)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        model.save_pretrained(tmp)
        del model
        env = {**os.environ, "DEEPSHARD_BENCH_RANK": "1"}
        subprocess.run(
            [sys.executable, "-m", "deepshard.launcher", "--num_procs", "2", "--as_deepspeed", "on",
             os.path.abspath(__file__), tmp],
            env=env, check=True,
        )  # fmt: skip


if __name__ == "__main__":
    if os.environ.get("DEEPSHARD_BENCH_RANK"):
        rank_main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    else:
        main()
