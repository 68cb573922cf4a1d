"""The paged KV cache: one tensor holding every layer's K and V in fixed-size blocks, a block pool
that hands blocks out, and the per-request block tables that map token positions to slots.

Layout of the cache tensor: [num_layers, num_blocks * block_size, 2, num_kv_heads, head_dim].
A token at position p of a request whose block table is `bt` lives at slot
`bt[p // block_size] * block_size + p % block_size`; index 0 of the third axis is K, 1 is V.
Block ids are private to one engine: they never appear in anything exported.
With `shared_memory=True` (CPU only) the tensor lives in a named file under /dev/shm
(engine/shared_memory.py) so a same-host KV sender can write into reserved blocks directly; the
file is unlinked by `close()`, garbage collection or process exit.
"""

from __future__ import annotations

import math

import torch

from engine.shared_memory import SharedSegment


class KVCacheExhausted(RuntimeError):
    """Not enough free KV blocks for the request; nothing was allocated."""

    def __init__(self, needed_blocks: int, free_blocks: int, total_blocks: int):
        self.needed_blocks, self.free_blocks, self.total_blocks = needed_blocks, free_blocks, total_blocks
        super().__init__(
            f"KV cache exhausted: need {needed_blocks} blocks, {free_blocks} of "
            f"{total_blocks} free"
        )


class BlockPool:
    """A free list of block ids. Allocation is all-or-nothing; double frees are caught."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: low block ids are handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheExhausted(n, len(self._free), self.num_blocks)
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._in_use[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._in_use[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._in_use[b] = 0
        self._free.extend(reversed(blocks))


class KVCache:
    """The cache tensor plus the block pool; owns slot arithmetic for block tables."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 shared_memory: bool = False):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        shape = (num_layers, num_blocks * block_size, 2, num_kv_heads, head_dim)
        self.segment: SharedSegment | None = None
        if shared_memory:
            if torch.device(device).type != "cpu":
                raise ValueError(f"a shared-memory KV cache must be on the CPU, not {device}")
            # Sparse file, mapped: like torch.empty, no page is touched until written.
            self.segment = SharedSegment(math.prod(shape) * torch.tensor([], dtype=dtype).element_size())
            self.tensor = self.segment.tensor(shape, dtype)
        else:
            # [layers, slots, 2 (K, V), kv_heads, head_dim]; torch.empty does not touch the pages.
            self.tensor = torch.empty(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def close(self) -> None:
        """Unlinks the shared-memory file, if any (the tensor stays usable in this process)."""
        if self.segment is not None:
            self.segment.close()

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `block_table` covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extends `block_table` in place to cover `num_tokens`; raises KVCacheExhausted."""
        need = self.blocks_needed(block_table, num_tokens)
        if need:
            block_table.extend(self.pool.allocate(need))

    def release(self, block_table: list[int]) -> None:
        self.pool.free(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of positions [start, end) as a CPU int64 tensor."""
        bs = self.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[pos // bs] * bs + pos % bs
