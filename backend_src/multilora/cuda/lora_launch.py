"""Launch planning for the LoRA kernels: variant, grid/block, and argument packing.

Pure Python on plain ints (device addresses, sizes), so all of it is tested without a GPU; the
CPU emulation in tests/cuda runs the real kernels through these same plans. The kernel
signatures below must match data/lora_kernels.cu (a test parses the .cu and compares).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

MAX_THREADS = 256  # LORA_MAX_THREADS in the .cu: shared buffers are sized for it
TOKENS_PER_TILE = 8  # LORA_TM in the .cu
MAX_GRID_YZ = 65535
MIN_K_PER_BLOCK = 256  # rows of h_in a shrink block sums before split-k stops paying off
BLOCKS_PER_SM = 4  # blocks in flight per SM we aim for, to hide memory latency
ELEMENT_BYTES = {"f16": 2, "bf16": 2, "f32": 4}

Signature = tuple[tuple[str, str], ...]  # (argument name, kind) in .cu order
# Per kernel family; kinds p = pointer, i = int, l = long long, f = float.
SIGNATURES: dict[str, Signature] = {
    "shrink_token": (("x", "p"), ("ldx", "l"), ("v", "p"), ("ldv", "i"), ("a_ptrs", "p"),
                     ("ranks", "p"), ("token_slots", "p"), ("num_tokens", "i"), ("h_in", "i"),
                     ("k_chunk", "i")),
    "expand_token": (("v", "p"), ("ldv", "i"), ("y", "p"), ("ldy", "l"), ("b_ptrs", "p"),
                     ("ranks", "p"), ("token_slots", "p"), ("num_tokens", "i"), ("h_out", "i")),
    "shrink_segment": (("x", "p"), ("ldx", "l"), ("v", "p"), ("ldv", "i"), ("a_ptrs", "p"),
                       ("ranks", "p"), ("seg_starts", "p"), ("seg_ends", "p"), ("seg_slots", "p"),
                       ("num_segments", "i"), ("h_in", "i"), ("k_chunk", "i")),
    "expand_segment": (("v", "p"), ("ldv", "i"), ("y", "p"), ("ldy", "l"), ("b_ptrs", "p"),
                       ("ranks", "p"), ("seg_starts", "p"), ("seg_ends", "p"), ("seg_slots", "p"),
                       ("num_segments", "i"), ("h_out", "i")),
}
# The arguments that change from call to call of one step (each layer's x, y, scratch and weights).
CALL_ARGS = ("x", "ldx", "y", "ldy", "v", "ldv", "a_ptrs", "b_ptrs", "ranks")
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_longlong, "f": ctypes.c_float}
_LIMITS = {"p": (0, 2**64 - 1), "i": (-(2**31), 2**31 - 1), "l": (-(2**63), 2**63 - 1),
           "f": (-3.4e38, 3.4e38)}


@dataclass(frozen=True)
class Launch:
    """One cuLaunchKernel: function name, grid, block, and (values, ctypes types) parameters."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: tuple[tuple[int, ...], tuple[type, ...]]


@dataclass(frozen=True)
class LoraProblem:
    """One LoRA call (one target of a projection) as plain ints: device addresses (0 = unused) and
    sizes in elements."""

    dtype: str  # "f16" | "bf16" | "f32": x, y and the weights; v is always fp32
    num_tokens: int
    h_in: int
    h_out: int
    x: int
    ldx: int
    y: int
    ldy: int
    v: int  # fp32 [num_tokens, ldv], zeroed: shrink adds into it
    ldv: int  # >= the largest rank in the table
    a_ptrs: int  # int64 [num_slots]: address of each slot's A^T, 0 = none
    b_ptrs: int
    ranks: int  # int32 [num_slots]: 0 = none
    token_slots: int = 0  # int32 [num_tokens], for the token variant
    seg_starts: int = 0  # int32 [num_segments] each, for the segment variant
    seg_ends: int = 0
    seg_slots: int = 0
    num_segments: int = 0
    max_segment_len: int = 0


def pack_args(family: str, **values: int) -> tuple[tuple[int, ...], tuple[type, ...]]:
    """The (values, types) pair cuLaunchKernel takes for a LoRA kernel family (see `pack`)."""
    return pack(family, SIGNATURES[family], values)


def pack(family: str, sig: Signature, values: dict[str, int | float]) -> tuple[tuple, tuple[type, ...]]:
    """The (values, types) pair cuLaunchKernel takes, in the order of the kernel's signature.

    Out-of-range values are refused here: a silently truncated int would address wrong memory.
    """
    missing = {name for name, _ in sig} ^ set(values)
    if missing:
        raise ValueError(f"{family}: arguments differ from the signature: {sorted(missing)}")
    for name, kind in sig:
        lo, hi = _LIMITS[kind]
        value = values[name]
        if kind != "f" and value != int(value) or not lo <= value <= hi:  # NaN fails the range too
            raise ValueError(f"{family}: {name}={value} does not fit the kernel's {kind!r}")
    return (tuple(float(values[n]) if k == "f" else int(values[n]) for n, k in sig),
            tuple(_CTYPES[kind] for _, kind in sig))


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


def expand_block(h_out: int, row_blocks: int, vec: int, sm_count: int) -> tuple[int, int]:
    """(threads per block, column tiles): the widest block that still fills the GPU."""
    target = BLOCKS_PER_SM * max(sm_count, 1)
    for threads in (MAX_THREADS, 128, 64):
        tiles = math.ceil(h_out / (threads * vec))
        if row_blocks * tiles >= target:
            break
    if tiles > MAX_GRID_YZ:
        raise ValueError(f"h_out={h_out} needs {tiles} column tiles, over the grid limit")
    return threads, tiles


def _common(p: LoraProblem) -> dict[str, int]:
    return dict(v=p.v, ldv=p.ldv, ranks=p.ranks)


def plan_token(p: LoraProblem, sm_count: int) -> list[Launch]:
    """Decode shape: one block row per token; tokens without an adapter exit in the kernel."""
    splits, k_chunk = shrink_split(p.h_in, p.num_tokens, sm_count)
    threads, tiles = expand_block(p.h_out, p.num_tokens, vector_width(p.dtype), sm_count)
    slots = dict(token_slots=p.token_slots, num_tokens=p.num_tokens)
    return [
        Launch(f"lora_shrink_token_{p.dtype}", (p.num_tokens, splits, 1), (MAX_THREADS, 1, 1),
               pack_args("shrink_token", x=p.x, ldx=p.ldx, a_ptrs=p.a_ptrs, h_in=p.h_in,
                         k_chunk=k_chunk, **slots, **_common(p))),
        Launch(f"lora_expand_token_{p.dtype}", (p.num_tokens, tiles, 1), (threads, 1, 1),
               pack_args("expand_token", y=p.y, ldy=p.ldy, b_ptrs=p.b_ptrs, h_out=p.h_out,
                         **slots, **_common(p))),
    ]


def plan_segment(p: LoraProblem, sm_count: int) -> list[Launch]:
    """Prefill shape: block rows per segment, blockIdx.z striding over its token tiles."""
    z = max(1, min(MAX_GRID_YZ, math.ceil(p.max_segment_len / TOKENS_PER_TILE)))
    splits, k_chunk = shrink_split(p.h_in, p.num_segments * z, sm_count)
    threads, tiles = expand_block(p.h_out, p.num_segments * z, vector_width(p.dtype), sm_count)
    segs = dict(seg_starts=p.seg_starts, seg_ends=p.seg_ends, seg_slots=p.seg_slots,
                num_segments=p.num_segments)
    return [
        Launch(f"lora_shrink_segment_{p.dtype}", (p.num_segments, splits, z), (MAX_THREADS, 1, 1),
               pack_args("shrink_segment", x=p.x, ldx=p.ldx, a_ptrs=p.a_ptrs, h_in=p.h_in,
                         k_chunk=k_chunk, **segs, **_common(p))),
        Launch(f"lora_expand_segment_{p.dtype}", (p.num_segments, tiles, z), (threads, 1, 1),
               pack_args("expand_segment", y=p.y, ldy=p.ldy, b_ptrs=p.b_ptrs, h_out=p.h_out,
                         **segs, **_common(p))),
    ]


def plan(p: LoraProblem, variant: str, sm_count: int) -> list[Launch]:
    """The shrink and expand launches for `variant` ("token" or "segment")."""
    if variant == "token":
        return plan_token(p, sm_count)
    if variant == "segment":
        return plan_segment(p, sm_count)
    raise ValueError(f"unknown LoRA kernel variant {variant!r}; expected 'token' or 'segment'")


def for_call(launches: list[Launch], **values: int) -> list[Launch]:
    """A step's planned launches with one call's addresses and strides swapped in (CALL_ARGS)."""
    out = []
    for launch in launches:
        family = next(f for f in SIGNATURES if launch.kernel.startswith(f"lora_{f}_"))
        names = [name for name, _ in SIGNATURES[family]]
        args = list(launch.params[0])
        for name in CALL_ARGS:
            if name in names:
                args[names.index(name)] = int(values[name])
        out.append(Launch(launch.kernel, launch.grid, launch.block, (tuple(args), launch.params[1])))
    return out
