"""The block allocator of the paged KV cache: reference counts, a free list, and a prefix cache.

Every block of the pool is in exactly one of three states (:class:`BlockState`): ``FREE`` (no content
worth keeping), ``CACHED`` (no owner, but it still holds the keys/values of a known full block of
tokens and can be handed back to a sequence with the same prefix) or ``USED`` (``refs >= 1`` owners).
Free and cached blocks are both allocatable: allocation takes a free block first, then evicts the
least-recently released cached one.

Prefix sharing: a *full* block is identified by a hash chained over the token ids of all blocks up to
and including it, and the key holds this block's token ids themselves (compared on lookup), so a false match
needs a 64-bit collision of Python's tuple hash over the parent chain. A new sequence whose first full blocks are known gets those
blocks with their reference counts raised and skips their prefill. Only full blocks are shared and a
sequence only writes past its own length, so a shared block is never written again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class BlockState(enum.Enum):
    """Where a block stands (see the module docstring)."""

    FREE = "free"
    CACHED = "cached"
    USED = "used"


PrefixKey = tuple[int | None, tuple[int, ...]]
"""(hash of the parent prefix key or ``None`` for the first block, token ids of this block)."""


@dataclass
class _Block:
    refs: int = 0
    key: PrefixKey | None = None  # set once the block is full and registered


class NoFreeBlocksError(RuntimeError):
    """Raised by :meth:`BlockAllocator.allocate` when the pool is exhausted (the scheduler preempts)."""


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks-1`` with reference counts; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refs == 0 but content known; LRU order
        self._by_key: dict[PrefixKey, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_allocatable(self) -> int:
        """Blocks that :meth:`allocate` can hand out now (free plus evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks with at least one owner."""
        return self.num_blocks - self.num_allocatable

    def state(self, block: int) -> BlockState:
        """The :class:`BlockState` of ``block``."""
        if self._blocks[block].refs > 0:
            return BlockState.USED
        return BlockState.CACHED if block in self._cached else BlockState.FREE

    def refs(self, block: int) -> int:
        """How many sequences own ``block``."""
        return self._blocks[block].refs

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """One block with ``refs == 1``; raises :class:`NoFreeBlocksError` when none is allocatable."""
        if self._free:
            block, _ = self._free.popitem(last=False)
        elif self._cached:
            block, _ = self._cached.popitem(last=False)  # evict the least recently released
            key = self._blocks[block].key
            assert key is not None and self._by_key.get(key) == block
            del self._by_key[key]
            self._blocks[block].key = None
        else:
            raise NoFreeBlocksError(f"all {self.num_blocks} KV blocks are in use")
        self._blocks[block].refs = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; a block reaching 0 becomes cached (if registered) or free."""
        for block in blocks:
            info = self._blocks[block]
            assert info.refs > 0, f"block {block} released more often than it was taken"
            info.refs -= 1
            if info.refs == 0:
                if info.key is not None:
                    self._cached[block] = None
                else:
                    self._free[block] = None

    # ------------------------------------------------------------------ prefix cache
    @staticmethod
    def chain(parent: PrefixKey | None, tokens: tuple[int, ...]) -> PrefixKey:
        """The prefix key of a full block of ``tokens`` following the block whose key is ``parent``."""
        return (None if parent is None else hash(parent), tokens)

    def register(self, block: int, key: PrefixKey) -> None:
        """Record that ``block`` (owned, full) holds the prefix ``key``; a key already known keeps its block."""
        if not self.prefix_caching or key in self._by_key:
            return
        info = self._blocks[block]
        assert info.refs > 0 and info.key is None, (
            f"block {block} cannot be registered in state {self.state(block)}"
        )
        info.key = key
        self._by_key[key] = block

    def lookup(self, tokens: list[int], limit: int) -> tuple[list[int], list[PrefixKey]]:
        """Take a reference to the cached blocks covering the longest known prefix of ``tokens[:limit]``.

        Returns the blocks (in order, now owned by the caller) and their keys. Only whole blocks match.
        """
        blocks: list[int] = []
        keys: list[PrefixKey] = []
        if not self.prefix_caching:
            return blocks, keys
        parent: PrefixKey | None = None
        bs = self.block_size
        for i in range(limit // bs):
            key = self.chain(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self._by_key.get(key)
            if block is None:
                break
            info = self._blocks[block]
            if info.refs == 0:
                del self._cached[block]
            info.refs += 1
            blocks.append(block)
            keys.append(key)
            parent = key
        return blocks, keys

    def check_all_free(self) -> None:
        """Raise ``AssertionError`` naming the blocks that still have owners (used after a run drains)."""
        owned = [b for b, info in enumerate(self._blocks) if info.refs]
        assert not owned, f"KV blocks still owned after the run: {owned}"
