"""GPU microbenchmark of the LoRA kernels: achieved GB/s of shrink+expand vs the device's bandwidth.

    python bench/gpu_lora_bench.py [--h-in 4096] [--h-out 4096] [--dtype f16] [--iters 50]

A decode step with many distinct adapters is memory-bound (kernels/README.md), so the figure of
merit is bytes moved / kernel time next to what a device-to-device copy reaches on the same GPU.
Bytes counted: each distinct adapter's A and B once, x read once, y read and written once.
Kernel time comes from CUDA-graph replays of back-to-back calls, so Python launch overhead is
excluded; the "call us" column is the eager per-call time including it, and "torch us" the same
call on the generic matmul path (MULTILORA_LORA_KERNELS=0) for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from multilora.lora.ops import LoraBatch, LoraWeightTable, apply_lora  # noqa: E402
from multilora.lora.ops_cuda import KERNELS_ENV, step_segments  # noqa: E402
from multilora.kernels.launch import choose_variant  # noqa: E402

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
TOKENS = (1, 4, 16, 64, 256)
ADAPTERS = (1, 8, 64)
RANKS = (8, 16, 32, 64)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written), the practical ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def eager_us(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def graph_us(fn, iters: int, per_graph: int = 20) -> float | None:
    """Per-call GPU time from a CUDA graph of `per_graph` calls; None if capture is refused."""
    try:
        fn()  # builds the pointer tables outside the capture (they copy host -> device)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        print(f"  (graph capture failed, eager times only: {exc})", file=sys.stderr)
        return None
    reps = max(1, iters // per_graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * per_graph)


def case(h_in: int, h_out: int, dtype: torch.dtype, tokens: int, adapters: int, rank: int,
         iters: int) -> dict:
    table = LoraWeightTable(h_in, h_out, adapters)
    for s in range(adapters):
        table.set_slot(s, torch.randn(h_in, rank, device="cuda", dtype=dtype) / h_in**0.5,
                       torch.randn(rank, h_out, device="cuda", dtype=dtype) / rank**0.5)
    slots = sorted(t % adapters for t in range(tokens))  # the runner sorts tokens by slot
    batch = LoraBatch.from_token_slots(slots, "cuda")
    x = torch.randn(tokens, h_in, device="cuda", dtype=dtype)
    y = torch.zeros(tokens, h_out, device="cuda", dtype=dtype)
    esize = x.element_size()
    distinct = len(set(slots))
    nbytes = (distinct * rank * (h_in + h_out) + tokens * (h_in + 2 * h_out)) * esize

    def call() -> None:
        apply_lora(y, x, table, batch)

    kernel = graph_us(call, iters)
    eager = eager_us(call, iters)
    os.environ[KERNELS_ENV] = "0"
    try:
        torch_path = eager_us(call, iters)
    finally:
        del os.environ[KERNELS_ENV]
    segs = step_segments(batch)
    best = kernel if kernel is not None else eager
    return dict(tokens=tokens, adapters=distinct, rank=rank, mb=nbytes / 1e6,
                variant=choose_variant(segs.adapter_tokens, len(segs.slots)), kernel=kernel,
                eager=eager, torch=torch_path, gbs=nbytes / (best / 1e6) / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h-in", type=int, default=4096)
    parser.add_argument("--h-out", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_lora_bench: no CUDA device is visible to PyTorch; run this on a machine with an "
              "NVIDIA GPU (see kernels/README.md).", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs; d2d copy {bw:.0f} GB/s (read+write); "
          f"h_in {args.h_in}, h_out {args.h_out}, {args.dtype}")
    print(f"{'tokens':>6} {'adapt':>5} {'rank':>4} {'MB':>7} {'variant':>8} {'kernel us':>9} "
          f"{'call us':>8} {'torch us':>8} {'GB/s':>7} {'% copy':>6}")
    for tokens in TOKENS:
        for adapters in ADAPTERS:
            if adapters > tokens:
                continue
            for rank in RANKS:
                r = case(args.h_in, args.h_out, dtype, tokens, adapters, rank, args.iters)
                kernel = f"{r['kernel']:9.1f}" if r["kernel"] is not None else f"{'-':>9}"
                print(f"{r['tokens']:6d} {r['adapters']:5d} {r['rank']:4d} {r['mb']:7.2f} "
                      f"{r['variant']:>8} {kernel} {r['eager']:8.1f} {r['torch']:8.1f} "
                      f"{r['gbs']:7.0f} {100 * r['gbs'] / bw:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
