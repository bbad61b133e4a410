"""GPU microbenchmark of the LoRA kernels: achieved GB/s of shrink+expand vs the device's bandwidth.

    python -m bench.kernels.lora_bandwidth [--h-in 4096] [--h-out 4096] [--dtype bf16] [--iters 200]

A decode step with many distinct adapters is memory-bound (kernels/README.md), so the figure of
merit is bytes moved / kernel time next to what a device-to-device copy reaches on the same GPU,
measured in the same run. Bytes counted: each distinct adapter's A and B once, x read once, y read
and written once. Every case is built in enough copies (weights, x, y) that one round over them
is several times the L2 cache, and calls rotate over the copies, so no call finds its weights in L2.

Columns: "kernel us" is GPU time per call from CUDA-graph replays (no Python launch overhead),
"call us" the eager per-call time of the same launches, "torch us" the eager time of the torch
backend (the PyTorch path) on the same tensors (the engine's cuda_kernels=off). The kernels are
launched here through multilora.cuda (launch plans + module load) directly, so this measures them
alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch

from bench.common.gpu import DTYPES, l2_bytes, open_device, timed_us
from multilora.cuda import module as loader
from multilora.cuda.launches import PackedLaunch
from multilora.cuda.lora_launch import SIGNATURES, LoraProblem, choose_variant, descriptor, family_of, plan, v_floats

TOKENS = (1, 4, 16, 64, 256)
ADAPTERS = (1, 8, 64)
RANKS = (8, 16, 32, 64)
L2_ROUNDS = 4  # one round over the copies is this many times the L2 size
MAX_COPIES_BYTES = 2 << 30


@dataclass
class Call:
    """One LoRA call's device tensors and its planned launches (one copy of a case)."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # per slot (A^T [h_in, r], B^T [r, h_out])
    slots: list[int]
    launches: list[PackedLaunch] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)


def segments_of(slots: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, slot) runs of equal slots, as the runner lays a step out."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            runs.append((start, i, slots[start]))
            start = i
    return runs


def make_call(h_in: int, h_out: int, dtype: torch.dtype, slots: list[int], rank: int,
              sm_count: int, device: torch.device) -> Call:
    """Random weights for every slot in `slots`, and the shrink/expand launches for them."""
    num_slots = max(slots) + 1
    weights = [(torch.randn(h_in, rank, device=device, dtype=dtype) / h_in**0.5,
                torch.randn(rank, h_out, device=device, dtype=dtype) / rank**0.5)
               for _ in range(num_slots)]
    x = torch.randn(len(slots), h_in, device=device, dtype=dtype)
    segs = segments_of(slots)
    desc = descriptor([[a.data_ptr() for a, _ in weights]], [[b.data_ptr() for _, b in weights]], [[rank] * num_slots],
                      [(0, h_out, 0)])
    tables = [torch.tensor(desc, dtype=torch.int64, device=device),
              torch.tensor(slots, dtype=torch.int32, device=device),
              torch.tensor([list(s) for s in zip(*segs)], dtype=torch.int32, device=device)]
    desc_t, token_slots, seg = tables
    problem = LoraProblem(
        dtype={torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}[dtype],
        num_tokens=len(slots), h_in=h_in, h_outs=(h_out,), num_slots=num_slots, x=x.data_ptr(), ldx=h_in,
        y=0, ldy=h_out, v=0, ldv=rank, desc=desc_t.data_ptr(), token_slots=token_slots.data_ptr(),
        seg_starts=seg[0].data_ptr(), seg_ends=seg[1].data_ptr(), seg_slots=seg[2].data_ptr(),
        num_segments=len(segs), max_segment_len=max(e - s for s, e, _ in segs))
    variant = choose_variant(len(slots), len(segs))
    call = Call(x, torch.zeros(len(slots), h_out, device=device, dtype=dtype),
                torch.empty(v_floats(problem, variant, sm_count), device=device, dtype=torch.float32), weights, slots)
    planned = plan(dataclasses.replace(problem, y=call.y.data_ptr(), v=call.v.data_ptr()), variant, sm_count)
    call.launches = [PackedLaunch(launch, SIGNATURES[family_of(launch.kernel)]) for launch in planned]
    call.keep = tables
    return call


def launch_call(kernels: loader.CudaKernels, call: Call) -> None:
    stream = torch.cuda.current_stream().cuda_stream if call.x.is_cuda else 0  # 0: the CPU emulation
    for launch in call.launches:
        kernels.launch(launch, stream)


def torch_call(call: Call) -> None:
    """The same call on the torch backend (lora/backends/torch.py): per-segment matmul pairs (what
    CUDA tensors get when the kernels are off). The one place the bench reaches into the op; keep it in step."""
    for start, end, slot in segments_of(call.slots):
        a, b = call.weights[slot]
        call.y[start:end].addmm_(call.x[start:end] @ a, b)


def graph_us(fn, calls: list[Call], rounds: int) -> float | None:
    """Per-call GPU time from a CUDA graph of one round over the copies; None if capture fails
    (or on the CPU)."""
    if not calls[0].x.is_cuda:
        return None
    try:
        for c in calls:
            fn(c)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                fn(c)
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        print(f"  (graph capture failed, eager times only: {exc})", file=sys.stderr)
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * len(calls))


def case(kernels: loader.CudaKernels, h_in: int, h_out: int, dtype: torch.dtype, tokens: int,
         adapters: int, rank: int, iters: int, copy_gbs: float, device: str = "cuda") -> dict:
    """One shape: `tokens` tokens over `adapters` distinct adapters (equal runs, sorted by slot).
    On a `device` "cpu" the kernels are the CPU emulation's (a dry run: host times, not GPU figures)."""
    device = torch.device(device)
    slots = sorted(t % adapters for t in range(tokens))
    esize = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = adapters * rank * (h_in + h_out) * esize
    nbytes = weight_bytes + tokens * (h_in + 2 * h_out) * esize
    copies = max(2, min(math.ceil(L2_ROUNDS * l2_bytes(device) / nbytes), MAX_COPIES_BYTES // nbytes))
    calls = [make_call(h_in, h_out, dtype, slots, rank, kernels.sm_count, device) for _ in range(copies)]
    rounds = max(1, iters // copies)
    kernel = graph_us(lambda c: launch_call(kernels, c), calls, rounds)
    eager = timed_us(lambda c: launch_call(kernels, c), calls, rounds, device.type)
    torch_path = timed_us(torch_call, calls, rounds, device.type)
    best = kernel if kernel is not None else eager
    gbs = nbytes / (best / 1e6) / 1e9
    return dict(tokens=tokens, adapters=adapters, rank=rank, h_in=h_in, h_out=h_out,
                mb=nbytes / 1e6, copies=copies, variant=calls[0].launches[0].kernel.split("_")[2],
                kernel_us=kernel, call_us=eager, torch_us=torch_path, gbs=gbs,
                copy_fraction=gbs / copy_gbs)


def row_text(r: dict) -> str:
    kernel = f"{r['kernel_us']:9.1f}" if r["kernel_us"] is not None else f"{'-':>9}"
    return (f"{r['tokens']:6d} {r['adapters']:5d} {r['rank']:4d} {r['mb']:7.2f} {r['variant']:>8} "
            f"{kernel} {r['call_us']:8.1f} {r['torch_us']:8.1f} {r['gbs']:7.0f} "
            f"{100 * r['copy_fraction']:5.1f}%")


HEADER = (f"{'tokens':>6} {'adapt':>5} {'rank':>4} {'MB':>7} {'variant':>8} {'kernel us':>9} "
          f"{'call us':>8} {'torch us':>8} {'GB/s':>7} {'% copy':>6}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h-in", type=int, default=4096)
    parser.add_argument("--h-out", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    if (device := open_device("bench.kernels.lora_bandwidth")) is None:
        return 2
    kernels, bw, named = device
    print(f"{named}; h_in {args.h_in}, h_out {args.h_out}, {args.dtype}; {kernels.ptx_source}")
    print(HEADER)
    for tokens in TOKENS:
        for adapters in ADAPTERS:
            if adapters > tokens:
                continue
            for rank in RANKS:
                print(row_text(case(kernels, args.h_in, args.h_out, DTYPES[args.dtype], tokens,
                                    adapters, rank, args.iters, bw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
