"""Launch planning for the LoRA kernels: variant, grid/block, argument packing and the descriptor
of a projection's targets.

Pure Python on plain ints (device addresses, sizes), so all of it is tested without a GPU; the
CPU emulation in tests/cuda runs the real kernels through these same plans. The kernel
signatures below must match data/lora_kernels.cu (a test parses the .cu and compares).

One launch pair (shrink, expand) covers every target of a projection, since they share x: q, k
and v of a fused qkv, gate and up. What differs per target (its weights per slot, ranks, output
columns) is read by the kernels from the projection's descriptor, an int64 array in device memory
(`descriptor` below lays it out), so every layer's calls of one shape share one plan and differ
only in x, y and the descriptor's address.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .launches import Launch, Signature, pack

MAX_THREADS = 256  # LORA_MAX_THREADS in the .cu: shared buffers are sized for it
TOKENS_PER_TILE = 8  # LORA_TM in the .cu
MAX_GRID_YZ = 65535
MIN_K_PER_BLOCK = 256  # rows of h_in a shrink block sums before split-k stops paying off
BLOCKS_PER_SM = 4  # blocks in flight per SM we aim for, to hide memory latency
ELEMENT_BYTES = {"f16": 2, "bf16": 2, "f32": 4}

# Per kernel family; kinds p = pointer, i = int, l = long long, f = float.
_TARGETS = (("desc", "p"), ("num_targets", "i"), ("num_slots", "i"))
_SEGMENTS = (("seg_starts", "p"), ("seg_ends", "p"), ("seg_slots", "p"), ("num_segments", "i"))
SIGNATURES: dict[str, Signature] = {
    "shrink_token": (("x", "p"), ("ldx", "l"), ("v", "p"), ("ldv", "i"), ("lds", "l"), *_TARGETS,
                     ("token_slots", "p"), ("num_tokens", "i"), ("h_in", "i"), ("k_chunk", "i")),
    "expand_token": (("v", "p"), ("ldv", "i"), ("lds", "l"), ("splits", "i"), ("y", "p"), ("ldy", "l"),
                     *_TARGETS, ("token_slots", "p"), ("num_tokens", "i")),
    "shrink_segment": (("x", "p"), ("ldx", "l"), ("v", "p"), ("ldv", "i"), ("lds", "l"), *_TARGETS,
                       *_SEGMENTS, ("h_in", "i"), ("k_chunk", "i")),
    "expand_segment": (("v", "p"), ("ldv", "i"), ("lds", "l"), ("splits", "i"), ("y", "p"), ("ldy", "l"),
                       *_TARGETS, *_SEGMENTS),
}
# The arguments that change from call to call of one plan (each layer's x, y and descriptor).
CALL_ARGS = ("x", "y", "desc")
DESC_TARGET_FIELDS = 3  # per target, after the per-slot arrays: first column in y, h_out, first column in v


def family_of(kernel: str) -> str:
    """'lora_shrink_token_bf16' -> 'shrink_token'."""
    return kernel.removeprefix("lora_").rsplit("_", 1)[0]


def descriptor(a_ptrs: Sequence[Sequence[int]], b_ptrs: Sequence[Sequence[int]], ranks: Sequence[Sequence[int]],
               columns: Sequence[tuple[int, int, int]]) -> list[int]:
    """A projection's targets as the kernels read them (int64): per target j and slot s, the address of
    A^T, of scale * B^T and the rank (0: no adapter there), as [J][S] arrays one after the other;
    then per target (first column in y, h_out, first column in v)."""
    if not len(a_ptrs) == len(b_ptrs) == len(ranks) == len(columns):
        raise ValueError("descriptor: one entry per target in every array")
    flat = [p for per in (a_ptrs, b_ptrs, ranks) for target in per for p in target]
    return flat + [c for cols in columns for c in cols]


@dataclass(frozen=True)
class LoraProblem:
    """One projection's LoRA call (all of its targets) as plain ints: device addresses (0 = unused)
    and sizes in elements."""

    dtype: str  # "f16" | "bf16" | "f32": x, y and the weights; v is always fp32
    num_tokens: int
    h_in: int
    h_outs: tuple[int, ...]  # each target's width, in the descriptor's order
    num_slots: int
    x: int
    ldx: int
    y: int  # the projection's output; target j's columns start at its descriptor column
    ldy: int
    v: int  # fp32 [splits, num_tokens, ldv]: each shrink split's partial sums (v_floats)
    ldv: int  # >= every target's first column in v + its largest rank
    desc: int  # the descriptor (see `descriptor`)
    token_slots: int = 0  # int32 [num_tokens], for the token variant
    seg_starts: int = 0  # int32 [num_segments] each, for the segment variant
    seg_ends: int = 0
    seg_slots: int = 0
    num_segments: int = 0
    max_segment_len: int = 0

    @property
    def num_targets(self) -> int:
        return len(self.h_outs)


def choose_variant(adapter_tokens: int, num_segments: int) -> str:
    """"segment" when segments average >= 2 tokens (weights reused across them), else "token"."""
    return "segment" if num_segments and adapter_tokens >= 2 * num_segments else "token"


def vector_width(dtype: str) -> int:
    """Elements per 16-byte load: columns one thread owns."""
    return 16 // ELEMENT_BYTES[dtype]


def shrink_split(h_in: int, row_blocks: int, sm_count: int) -> tuple[int, int]:
    """(k splits, rows per split) so that row_blocks * splits fills the GPU, without tiny splits."""
    target = BLOCKS_PER_SM * max(sm_count, 1)
    max_split = max(1, h_in // MIN_K_PER_BLOCK)
    splits = min(max_split, MAX_GRID_YZ, max(1, math.ceil(target / max(row_blocks, 1))))
    k_chunk = math.ceil(h_in / splits)
    return math.ceil(h_in / k_chunk), k_chunk  # recount so that no split is empty


def column_tiles(h_outs: Sequence[int], threads: int, vec: int) -> int:
    """Expand blocks per row of blocks: each target's columns in tiles of threads * vec."""
    return sum(math.ceil(h / (threads * vec)) for h in h_outs)


def expand_block(h_outs: Sequence[int], row_blocks: int, vec: int, sm_count: int) -> tuple[int, int]:
    """(threads per block, column tiles of all targets): the widest block that still fills the GPU."""
    target = BLOCKS_PER_SM * max(sm_count, 1)
    for threads in (MAX_THREADS, 128, 64):
        tiles = column_tiles(h_outs, threads, vec)
        if row_blocks * tiles >= target:
            break
    if tiles > MAX_GRID_YZ:
        raise ValueError(f"h_out {tuple(h_outs)} needs {tiles} column tiles, over the grid limit")
    return threads, tiles


def _row_blocks(p: LoraProblem, variant: str) -> tuple[int, int]:
    """(block rows, token-tile strides z): one block row per token, or per segment and tile stride."""
    if variant == "token":
        return p.num_tokens, 1
    if variant == "segment":
        z = max(1, min(MAX_GRID_YZ, math.ceil(p.max_segment_len / TOKENS_PER_TILE)))
        return p.num_segments, z
    raise ValueError(f"unknown LoRA kernel variant {variant!r}; expected 'token' or 'segment'")


def shrink_splits(p: LoraProblem, variant: str, sm_count: int) -> tuple[int, int]:
    """(splits, k_chunk) of the shrink: blocks of every target fill the GPU together."""
    rows, z = _row_blocks(p, variant)
    splits, k_chunk = shrink_split(p.h_in, rows * z * p.num_targets, sm_count)
    if splits * p.num_targets > MAX_GRID_YZ:
        raise ValueError(f"{p.num_targets} targets x {splits} splits is over the grid limit")
    return splits, k_chunk


def v_floats(p: LoraProblem, variant: str, sm_count: int) -> int:
    """fp32 elements of the scratch v a plan of `p` needs: every split's partial sums."""
    return shrink_splits(p, variant, sm_count)[0] * p.num_tokens * p.ldv


def plan(p: LoraProblem, variant: str, sm_count: int) -> list[Launch]:
    """The shrink and expand launches for `variant` ("token" or "segment").

    Shrink writes each k split's partial sums to its own slice of v (no atomics, so nothing to
    zero first); expand adds the splits up as it stages v."""
    rows, z = _row_blocks(p, variant)
    splits, k_chunk = shrink_splits(p, variant, sm_count)
    threads, tiles = expand_block(p.h_outs, rows * z, vector_width(p.dtype), sm_count)
    shared = dict(v=p.v, ldv=p.ldv, lds=p.num_tokens * p.ldv, desc=p.desc, num_targets=p.num_targets,
                  num_slots=p.num_slots)
    if variant == "token":
        rows_of = dict(token_slots=p.token_slots, num_tokens=p.num_tokens)
    else:
        rows_of = dict(seg_starts=p.seg_starts, seg_ends=p.seg_ends, seg_slots=p.seg_slots,
                       num_segments=p.num_segments)
    shrink, expand = f"shrink_{variant}", f"expand_{variant}"
    return [
        Launch(f"lora_{shrink}_{p.dtype}", (rows, splits * p.num_targets, z), (MAX_THREADS, 1, 1),
               pack(shrink, SIGNATURES[shrink], dict(x=p.x, ldx=p.ldx, h_in=p.h_in, k_chunk=k_chunk,
                                                     **rows_of, **shared))),
        Launch(f"lora_{expand}_{p.dtype}", (rows, tiles, z), (threads, 1, 1),
               pack(expand, SIGNATURES[expand], dict(y=p.y, ldy=p.ldy, splits=splits, **rows_of, **shared))),
    ]
