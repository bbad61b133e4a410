"""The KV cache: allocated once within a byte budget, handed out in fixed-size blocks.

A sequence reserves the blocks for its prompt plus `max_tokens` when it is admitted, so a running
sequence can never run out of cache mid-generation and nothing needs preempting; a request that
cannot get its blocks waits, in arrival order, until finished requests give theirs back.

A request with n choices computes its prompt once: its choices share the prompt's full blocks
(each block counts its holders and returns to the free list when the last one frees it), and each
choice has blocks of its own for the rest: the prompt's last, partly filled block, which gets a
copy of the prompt's entries there when the choices fork (`copy_blocks`), and its output's.
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
        self._holders = [0] * num_blocks  # sequences whose block table holds each block

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def choice_blocks(self, prompt_tokens: int, total_tokens: int) -> tuple[int, int]:
        """(shared, own): a request's blocks for `total_tokens` per choice are the prompt's full
        blocks, which its choices share, and for each choice `own` blocks: the rest of the prompt
        and its output. Its n choices take shared + n * own blocks."""
        shared = prompt_tokens // self.block_size
        return shared, self.blocks_for(total_tokens) - shared

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for block in blocks:
            self._holders[block] = 1
        return blocks

    def share(self, blocks: list[int], holders: int) -> None:
        """`holders` more block tables hold these (allocated) blocks; each frees them once."""
        for block in blocks:
            self._holders[block] += holders

    def free(self, blocks: list[int]) -> None:
        """One holder gives the blocks back; a block nobody holds any more is free again."""
        for block in blocks:
            self._holders[block] -= 1
            if not self._holders[block]:
                self._free.append(block)

    def holders(self, block: int) -> int:
        return self._holders[block]

    def hold_back(self, num_blocks: int) -> list[int] | None:
        """Blocks taken out for good, before any request (the CUDA graphs' padded rows write into
        one): from then on `num_blocks` counts only what requests can have. None if not that many free."""
        blocks = self.allocate(num_blocks)
        if blocks is not None:
            self.num_blocks -= num_blocks
        return blocks

    def give_back(self, blocks: list[int]) -> None:
        """Blocks held back are the requests' again."""
        self.num_blocks += len(blocks)
        self.free(blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's entries, in every layer (the fork: see the module docstring)."""
        if not pairs:
            return
        bs = self.block_size
        offsets = torch.arange(bs)
        src = torch.cat([offsets + s * bs for s, _ in pairs]).to(self.layers[0][0].device)
        dst = torch.cat([offsets + d * bs for _, d in pairs]).to(self.layers[0][0].device)
        for k, v in self.layers:
            k[dst] = k[src]
            v[dst] = v[src]
