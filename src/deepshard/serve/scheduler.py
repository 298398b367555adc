"""The continuous-batching scheduler: Dynamic SplitFuse over a paged KV cache.

Every pass (:meth:`Scheduler.schedule`) fills a budget of ``max_ragged_batch_size`` tokens and at
most ``max_ragged_sequence_count`` sequences, in this order:

1. one decode token for every running sequence that has finished its prompt (so a running decode never
   waits a pass, whatever is admitted - the point of SplitFuse);
2. the next chunk of every running sequence still in its prompt, as much as the budget leaves;
3. new sequences from the queue, first come first served, each with a first chunk (after whatever
   prefix of full blocks the prefix cache already holds).

Each sequence gets the blocks its tokens need before it is scheduled. When the pool runs out for a
decode, the most recently arrived running sequence that is not yet in this pass is *preempted by
recompute*: its blocks are released (full ones stay in the prefix cache, so the recompute is mostly a
cache hit) and it goes back to the front of the queue. Admission never preempts: a new sequence waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

from deepshard.serve.block_allocator import BlockAllocator
from deepshard.serve.config import ServeConfig
from deepshard.serve.sequence import FinishReason, SeqState, Sequence


@dataclass
class SchedulerCounters:
    """Monotonic counters of a scheduler (exported as Prometheus counters by the server)."""

    passes: int = 0
    """Forward passes scheduled."""
    scheduled_tokens: int = 0
    """Tokens run, over all passes (decode + prefill)."""
    decode_tokens: int = 0
    prefill_tokens: int = 0
    sampled_tokens: int = 0
    """Passes' sequences that produced a token (the useful part of the slot-steps)."""
    slot_steps: int = 0
    """``passes * max_ragged_sequence_count``: the sequence slots the passes offered."""
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    """Prompt tokens whose keys/values came from the prefix cache instead of being computed."""
    admitted: int = 0
    """Admissions from the queue, re-admissions after a preemption included."""
    finished: int = 0
    aborted: int = 0

    def as_dict(self) -> dict[str, int]:
        """Name -> value."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_new`` tokens of ``seq`` from position ``seq.num_computed``; ``sample``: this chunk ends the pending tokens."""

    seq: Sequence
    num_new: int

    @property
    def sample(self) -> bool:
        """Whether the pass yields this sequence's next token."""
        return self.seq.num_computed + self.num_new == len(self.seq.tokens)


class Scheduler:
    """Queues, running set and block accounting of the engine; see the module docstring."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.allocator = BlockAllocator(
            config.num_kv_blocks, config.block_size, prefix_caching=config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.counters = SchedulerCounters()

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``ValueError`` when it could never fit in the KV pool alone."""
        bs = self.config.block_size
        need = -(-(seq.prompt_len + seq.params.max_tokens) // bs)
        if need > self.config.num_kv_blocks:
            raise ValueError(
                f"request {seq.request_id}: {seq.prompt_len} prompt + {seq.params.max_tokens} new tokens need {need} "
                f"KV blocks of {bs}, the pool has num_kv_blocks={self.config.num_kv_blocks}; lower max_tokens or "
                "raise num_kv_blocks."
            )
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        """Sequences queued or running."""
        return len(self.waiting) + len(self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` wherever it is and free its blocks."""
        if seq.state is SeqState.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, FinishReason.ABORT)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark ``seq`` finished with ``reason``, free its blocks, count it."""
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.block_table, seq.block_keys = [], []
        seq.state, seq.finish_reason = SeqState.FINISHED, reason
        if reason is FinishReason.ABORT:
            self.counters.aborted += 1
        else:
            self.counters.finished += 1

    # ------------------------------------------------------------------ blocks
    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, -(-(seq.num_computed + num_new) // self.config.block_size) - len(seq.block_table))

    def _grow(self, seq: Sequence, num_new: int) -> None:
        for _ in range(self._blocks_needed(seq, num_new)):
            seq.block_table.append(self.allocator.allocate())

    def _fit(self, seq: Sequence, want: int) -> int:
        """The most of ``want`` tokens whose blocks are allocatable now."""
        bs = self.config.block_size
        room = (len(seq.block_table) + self.allocator.num_allocatable) * bs - seq.num_computed
        return max(0, min(want, room))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.block_table, seq.block_keys, seq.num_computed = [], [], 0
        seq.state = SeqState.WAITING
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    # ------------------------------------------------------------------ one pass
    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of the next forward pass (empty when nothing is queued or running)."""
        cfg = self.config
        budget = cfg.max_ragged_batch_size
        plan: list[ScheduledChunk] = []
        planned: set[str] = set()
        for seq in [s for s in self.running if s.pending == 1]:
            if seq.state is not SeqState.RUNNING:
                continue  # preempted earlier in this loop
            while self._blocks_needed(seq, 1) > self.allocator.num_allocatable:
                victims = [s for s in self.running if s.request_id not in planned]
                self._preempt(victims[-1])
                if victims[-1] is seq:
                    break
            if seq.state is not SeqState.RUNNING:
                continue
            self._grow(seq, 1)
            plan.append(ScheduledChunk(seq, 1))
            planned.add(seq.request_id)
            budget -= 1
        for seq in [s for s in self.running if s.pending > 1]:
            take = self._fit(seq, min(seq.pending, budget))
            if take == 0:
                continue
            self._grow(seq, take)
            plan.append(ScheduledChunk(seq, take))
            budget -= take
        while self.waiting and budget > 0 and len(self.running) < cfg.max_ragged_sequence_count:
            seq = self.waiting[0]
            blocks, keys = self.allocator.lookup(seq.tokens, len(seq.tokens) - 1)
            seq.block_table, seq.block_keys = blocks, keys
            seq.num_computed = len(blocks) * cfg.block_size
            take = self._fit(seq, min(seq.pending, budget))
            if take == 0:  # a waiting sequence holds no blocks (else it could starve the running ones)
                self.allocator.release(seq.block_table)
                seq.block_table, seq.block_keys, seq.num_computed = [], [], 0
                break
            self.counters.prefix_hit_tokens += seq.num_computed
            self.waiting.popleft()
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            self.counters.admitted += 1
            self._grow(seq, take)
            plan.append(ScheduledChunk(seq, take))
            budget -= take
        if plan:
            c = self.counters
            c.passes += 1
            c.slot_steps += cfg.max_ragged_sequence_count
            for chunk in plan:
                c.scheduled_tokens += chunk.num_new
                if chunk.seq.num_computed >= chunk.seq.prompt_len:
                    c.decode_tokens += chunk.num_new
                else:
                    c.prefill_tokens += chunk.num_new
        return plan

    def commit(self, plan: list[ScheduledChunk]) -> None:
        """Record that ``plan``'s tokens are in the cache and register the blocks they filled."""
        bs = self.config.block_size
        for chunk in plan:
            seq = chunk.seq
            seq.num_computed += chunk.num_new
            for i in range(len(seq.block_keys), seq.num_computed // bs):
                parent = seq.block_keys[-1] if seq.block_keys else None
                key = self.allocator.chain(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))
                self.allocator.register(seq.block_table[i], key)
                seq.block_keys.append(key)
