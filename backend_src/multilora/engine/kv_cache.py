"""The KV cache: allocated once within a byte budget, handed out in fixed-size blocks.

A sequence reserves the blocks for its prompt plus `max_tokens` when it is admitted, so a running
sequence can never run out of cache mid-generation and nothing needs preempting; a request that
cannot get its blocks waits, in arrival order, until finished requests give theirs back.
"""
from __future__ import annotations

from collections import deque

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self._free: deque[int] = deque(range(num_blocks))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self._free):
            return None
        return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
