"""HF Trainer tokens/s: deepshard (through the ``import deepspeed`` alias) vs DeepSpeed 0.19.8, one run.

The same unmodified Trainer script, the same ds_config ("auto" values, ZeRO-2 or ZeRO-3), the same
random-weight Llama (about 20M parameters, sequence 128, micro-batch 4, 2 gloo ranks, one thread per
rank, fp32), timed over the steps after warm-up. deepshard runs in this interpreter's environment;
DeepSpeed in another one given with ``--deepspeed-python`` (``DS_BUILD_OPS=0 pip install
deepspeed==0.19.8`` there, with the same torch, transformers and accelerate). Rounds alternate between
the two so that machine load falls on both alike; the median of the rounds is reported:

    python benchmarks/hf_trainer_throughput.py --deepspeed-python /work/venv-ds/bin/python --stage 2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SEQ, MICRO, STEPS, WARMUP = 128, 4, 30, 5


def rank_main(stage: int, out: str) -> None:
    import torch
    from torch.utils.data import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(1)

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 100000

        def __getitem__(self, i: int) -> dict:
            ids = torch.randint(0, 8192, (SEQ,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
    }
    training = TrainingArguments(output_dir=f"{out}.run", per_device_train_batch_size=MICRO, max_steps=STEPS,
                                 learning_rate=1e-4, deepspeed=ds, report_to=[], use_cpu=True, ddp_backend="gloo",
                                 logging_steps=1000, save_strategy="no", seed=0, disable_tqdm=True,
                                 dataloader_drop_last=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                                         num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6))  # fmt: skip
    clock = Clock()
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[clock])
    trainer.train()
    if trainer.is_world_process_zero():
        seconds = clock.times[-1] - clock.times[WARMUP - 1]
        tokens = (STEPS - WARMUP) * MICRO * SEQ * torch.distributed.get_world_size()
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": tokens / seconds, "engine": type(trainer.model_wrapped).__module__,
                       "params": sum(p.numel() for p in model.parameters())}, fh)  # fmt: skip


def run(which: str, python: str, stage: int, out: str, port: int) -> dict:
    script = os.path.abspath(__file__)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DEEPSHARD_BENCH_RANK="1", OMP_NUM_THREADS="1")
    if which == "deepshard":
        cmd = [python, "-m", "deepshard.launcher", "--num_procs", "2", "--master_port", str(port),
               "--as_deepspeed", "on", script, "--stage", str(stage), "--out", out]  # fmt: skip
    else:
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               script, "--stage", str(stage), "--out", out]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--deepspeed-python", required=True, help="python of an environment with DeepSpeed 0.19.8"
    )
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found: dict[str, list[float]] = {"deepshard": [], "deepspeed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, which in enumerate(
                ("deepshard", "deepspeed") if r % 2 == 0 else ("deepspeed", "deepshard")
            ):
                python = sys.executable if which == "deepshard" else args.deepspeed_python
                result = run(which, python, args.stage, f"{tmp}/{which}{r}.json", 29700 + 10 * r + i)
                found[which].append(result["tokens_per_s"])
                print(f"round {r} {which:9s} ({result['engine']}, {result['params'] / 1e6:.1f}M params): "
                      f"{result['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
    for path in glob.glob("/dev/shm/deepspeed_*"):
        os.remove(path)
    ours, theirs = statistics.median(found["deepshard"]), statistics.median(found["deepspeed"])
    print(f"ZeRO-{args.stage}: deepshard {ours:.0f} tokens/s, DeepSpeed 0.19.8 {theirs:.0f} tokens/s: "
          f"{ours / theirs:.2f}x (median of {args.rounds} rounds each)")  # fmt: skip


if __name__ == "__main__":
    if os.environ.get("DEEPSHARD_BENCH_RANK"):
        ns = argparse.ArgumentParser()
        ns.add_argument("--stage", type=int)
        ns.add_argument("--out")
        known, _ = ns.parse_known_args()
        rank_main(known.stage, known.out)
    else:
        main()
