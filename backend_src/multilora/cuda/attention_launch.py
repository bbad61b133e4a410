"""Launch planning for the paged decode attention kernels: context splits, grid/block, arguments.

Pure Python on plain ints (device addresses, sizes), tested without a GPU; the CPU emulation in
tests/cuda runs the real kernels through these plans. The signatures below must match
PA_DEFINE_KERNELS in data/lora_kernels.cu (a test parses the .cu and compares).

A decode row's attention reads its whole context once, so it is memory-bound: the grid must have
enough blocks in flight to keep the memory system busy. One block per (row, KV head, group tile)
is too few for small batches with long contexts, so long contexts are split (split-k) and a
second, small kernel merges the splits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .launches import Launch, Signature, pack
from .lora_launch import BLOCKS_PER_SM, MAX_GRID_YZ

THREADS = 128  # PA_THREADS in the .cu
GROUP_TILE = 4  # PA_GROUP: query heads one block serves
MAX_HEAD_DIM = 256  # PA_MAX_D
MIN_SPLIT_KEYS = 256  # keys a split block reads at least, or the merge costs more than it saves
DTYPES = ("f16", "bf16", "f32")

SIGNATURES: dict[str, Signature] = {
    "paged_decode": (("q", "p"), ("ldq", "l"), ("k_cache", "p"), ("v_cache", "p"),
                     ("block_tables", "p"), ("ld_table", "i"), ("ctx_lens", "p"), ("num_rows", "i"),
                     ("num_heads", "i"), ("kv_heads", "i"), ("head_dim", "i"), ("block_size", "i"),
                     ("window", "i"), ("scale", "f"), ("split_len", "i"), ("out", "p"), ("ldo", "l"),
                     ("part_out", "p"), ("part_ml", "p")),
    "paged_reduce": (("part_out", "p"), ("part_ml", "p"), ("num_splits", "i"), ("num_heads", "i"),
                     ("head_dim", "i"), ("out", "p"), ("ldo", "l")),
}
# The arguments that change from layer to layer of one step (each layer has its own cache, q, out).
LAYER_ARGS = ("q", "k_cache", "v_cache", "out")


def family_of(kernel: str) -> str:
    """'paged_decode_bf16' -> 'paged_decode'."""
    return kernel.rsplit("_", 1)[0]


@dataclass(frozen=True)
class DecodeShape:
    """What a step's plan depends on: the same for every layer with the same window."""

    dtype: str  # "f16" | "bf16" | "f32": q, the caches and out
    num_rows: int
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    window: int  # 0: full causal
    scale: float
    max_context: int  # the longest context among the rows (host side, known when the step is built)

    def check(self) -> None:
        """Refuse what the kernels cannot do; the caller then takes the PyTorch path."""
        if self.dtype not in DTYPES:
            raise ValueError(f"paged decode: dtype {self.dtype!r} is not one of {DTYPES}")
        if not 0 < self.head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"paged decode: head_dim {self.head_dim} is over {MAX_HEAD_DIM}")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(f"paged decode: {self.num_heads} heads are not a multiple of {self.kv_heads} KV heads")
        if self.num_rows < 1 or self.block_size < 1 or self.max_context < 1 or self.window < 0:
            raise ValueError(f"paged decode: nothing to attend to in {self}")

    @property
    def visible(self) -> int:
        """The most keys any row attends to."""
        return min(self.max_context, self.window) if self.window else self.max_context

    @property
    def group_tiles(self) -> int:
        return math.ceil(self.num_heads // self.kv_heads / GROUP_TILE)


def split_context(shape: DecodeShape, sm_count: int) -> tuple[int, int]:
    """(splits, keys per split): enough blocks to fill the GPU, no split under MIN_SPLIT_KEYS."""
    blocks = shape.num_rows * shape.kv_heads * shape.group_tiles
    wanted = math.ceil(BLOCKS_PER_SM * max(sm_count, 1) / blocks)
    splits = max(1, min(wanted, shape.visible // MIN_SPLIT_KEYS, MAX_GRID_YZ))
    split_len = math.ceil(shape.visible / splits)
    return math.ceil(shape.visible / split_len), split_len  # recount so that no split is empty


def scratch_floats(shape: DecodeShape, splits: int) -> tuple[int, int]:
    """fp32 elements of the split partials: (outputs [rows, heads, splits, d], (max, sum) pairs)."""
    if splits == 1:
        return 0, 0
    heads = shape.num_rows * shape.num_heads * splits
    return heads * shape.head_dim, heads * 2


def plan_decode(shape: DecodeShape, splits: int, split_len: int, **addresses: int) -> list[Launch]:
    """The launches of one layer: the decode kernel, and the merge when there are several splits.

    `addresses`: q, ldq, k_cache, v_cache, block_tables, ld_table, ctx_lens, out, ldo, part_out,
    part_ml (0 for the partials when splits == 1)."""
    shape.check()
    if splits > 1 and not (addresses["part_out"] and addresses["part_ml"]):
        raise ValueError("paged decode: several splits need the partial buffers")
    s = shape
    grid = (s.num_rows, s.kv_heads * s.group_tiles, splits)
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"paged decode: {s.kv_heads} KV heads x {s.group_tiles} tiles is over the grid limit")
    decode = dict(num_rows=s.num_rows, num_heads=s.num_heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                  block_size=s.block_size, window=s.window, scale=s.scale, split_len=split_len, **addresses)
    launches = [Launch(f"paged_decode_{s.dtype}", grid, (THREADS, 1, 1),
                       pack("paged_decode", SIGNATURES["paged_decode"], decode))]
    if splits > 1:
        reduce = dict(part_out=addresses["part_out"], part_ml=addresses["part_ml"], num_splits=splits,
                      num_heads=s.num_heads, head_dim=s.head_dim, out=addresses["out"], ldo=addresses["ldo"])
        launches.append(Launch(f"paged_reduce_{s.dtype}", (s.num_rows, s.num_heads, 1), (THREADS, 1, 1),
                               pack("paged_reduce", SIGNATURES["paged_reduce"], reduce)))
    return launches
