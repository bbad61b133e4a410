"""GPU microbenchmark of decode attention per layer: our paged kernel vs the gather + SDPA path.

    python -m bench.kernels.decode_attention [--rows 32 64] [--contexts 1024 2048 4096] [--dtype bf16]

Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, KV blocks of 16 tokens), each
row's blocks scattered through the cache as in a running engine, contexts a few tokens apart.
Per case: the time per layer of `attention.paged_attention` for decode rows as the engine calls
it, once with the step's `PagedDecode` (our kernel, and its merge when the contexts are split) and
once without (the PyTorch path: every row's blocks copied out with index_select, then SDPA with a
mask), from CUDA events over eager calls that rotate over enough layers' caches that L2 holds
none of them. GB/s counts the K and V bytes the rows attend to, each read once (what the kernel
must read), next to a device-to-device copy's measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

from bench.common.gpu import DTYPES, l2_bytes, open_device, timed_us
from multilora.cuda import module as loader
from multilora.cuda.paged_decode import PagedDecode
from multilora.models.attention import AttentionMetadata, paged_attention, visible


@dataclass(frozen=True)
class Heads:
    """A layer's attention shape and the KV cache's block size."""

    heads: int
    kv_heads: int
    head_dim: int
    block: int

    def __str__(self) -> str:
        return f"{self.heads} heads, {self.kv_heads} KV heads, d {self.head_dim}, blocks of {self.block}"


LLAMA3_8B = Heads(32, 8, 128, 16)
ROWS = (32, 64)
CONTEXTS = (1024, 2048, 4096)
L2_ROUNDS = 4  # one round over the layers is this many times the L2 size
ROUNDS = 10


@dataclass
class Layer:
    q: torch.Tensor  # [rows, heads, head_dim]
    k_cache: torch.Tensor  # [slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    out: torch.Tensor


@dataclass
class Case:
    rows: int
    context: int
    layers: list[Layer]
    step: PagedDecode  # the kernel's per-step state, as the model runner builds it
    meta: AttentionMetadata  # the step's metadata, with the kernel
    kv_bytes: int  # K and V bytes the rows attend to

    def attend(self, layer: Layer, scale: float, kernel: bool) -> torch.Tensor:
        """One layer's decode attention as the engine runs it, with or without the kernel. No new
        keys or values are written (empty k/v): the cases measure reading the context."""
        meta = self.meta if kernel else dataclasses.replace(self.meta, paged_decode=None)
        new = layer.k_cache[:0]
        return paged_attention(layer.q, new, new, layer.k_cache, layer.v_cache, meta, scale, None)


def make_case(kernels: loader.CudaKernels, rows: int, context: int, dtype: torch.dtype, shape: Heads,
              device: torch.device) -> Case:
    block = shape.block
    lens = [context - r % block for r in range(rows)]  # partial last blocks too
    width = math.ceil(context / block)
    tables = torch.randperm(rows * width, device=device).view(rows, width)
    ctx_lens = torch.tensor(lens, device=device)
    esize = torch.tensor([], dtype=dtype).element_size()
    slots = rows * width * block
    layer_bytes = 2 * slots * shape.kv_heads * shape.head_dim * esize
    count = max(2, math.ceil(L2_ROUNDS * l2_bytes(device) / layer_bytes))

    def layer() -> Layer:
        q = torch.randn(rows, shape.heads, shape.head_dim, device=device, dtype=dtype)
        caches = (torch.randn(slots, shape.kv_heads, shape.head_dim, device=device, dtype=dtype) for _ in range(2))
        return Layer(q, *caches, torch.empty_like(q))

    keys = torch.arange(width * block, device=device)[None, :]
    step = PagedDecode.build(kernels, tables, ctx_lens, max(lens), block)
    meta = AttentionMetadata(cache_index=torch.empty(0, dtype=torch.int64, device=device),
                             decode_tokens=torch.arange(rows, device=device), decode_blocks=tables.reshape(-1),
                             decode_masks={None: visible((ctx_lens - 1)[:, None], keys, None)[:, None, None, :]},
                             block_size=block, prefill_rows=[], paged_decode=step)
    return Case(rows, context, [layer() for _ in range(count)], step, meta,
                sum(lens) * 2 * shape.kv_heads * shape.head_dim * esize)


def measure(kernels: loader.CudaKernels, rows: int, context: int, dtype: torch.dtype, copy_gbs: float,
            shape: Heads = LLAMA3_8B, device: str = "cuda", rounds: int = ROUNDS) -> dict:
    """One case: both paths' time per layer, the kernel's GB/s, and how far the two outputs differ.
    On a `device` "cpu" the kernel is the CPU emulation's (a dry run: host times, not GPU figures)."""
    case = make_case(kernels, rows, context, dtype, shape, torch.device(device))
    scale = shape.head_dim ** -0.5

    kernel_us = timed_us(lambda layer: case.attend(layer, scale, kernel=True), case.layers, rounds, device)
    sdpa_us = timed_us(lambda layer: case.attend(layer, scale, kernel=False), case.layers, rounds, device)
    first = case.layers[0]
    ours, theirs = case.attend(first, scale, kernel=True), case.attend(first, scale, kernel=False)
    diff = (ours.float() - theirs.float()).abs().max().item()
    splits = case.step.launches(first.q, first.k_cache, first.v_cache, first.out, scale, None)[0].grid[2]
    gbs = case.kv_bytes / (kernel_us / 1e6) / 1e9
    return dict(rows=rows, context=context, splits=splits, layers=len(case.layers), kernel_us=kernel_us,
                sdpa_us=sdpa_us, speedup=sdpa_us / kernel_us, gbs=gbs, copy_fraction=gbs / copy_gbs,
                max_diff=diff)


HEADER = (f"{'rows':>4} {'context':>7} {'splits':>6} {'kernel us':>9} {'sdpa us':>8} {'speedup':>7} "
          f"{'GB/s':>6} {'% copy':>6} {'max |diff|':>10}")


def row_text(r: dict) -> str:
    return (f"{r['rows']:4d} {r['context']:7d} {r['splits']:6d} {r['kernel_us']:9.1f} {r['sdpa_us']:8.1f} "
            f"{r['speedup']:6.2f}x {r['gbs']:6.0f} {100 * r['copy_fraction']:5.1f}% {r['max_diff']:10.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    if (device := open_device("bench.kernels.decode_attention")) is None:
        return 2
    kernels, copy, named = device
    print(f"{named}; {LLAMA3_8B}, {args.dtype}")
    print(HEADER)
    for rows in args.rows:
        for context in args.contexts:
            print(row_text(measure(kernels, rows, context, DTYPES[args.dtype], copy)))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
