"""What the GPU benchmarks share: the opening (our kernels loaded, the copy bandwidth measured, one
line naming the device, or a clear message without a GPU), the dtypes they take, eager timing with
CUDA events and the L2 size their cases must exceed. On a CPU device (the GPU check's dry run, the
kernels on their CPU emulation) timing takes the host clock and there is no L2 to defeat."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from bench.common.bandwidth import device_copy_gbs
from multilora.cuda import module as loader

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
T = TypeVar("T")


def open_device(script: str) -> tuple[loader.CudaKernels, float, str] | None:
    """Our kernels on the GPU, its device-to-device copy GB/s and a line naming both; None (said
    on stderr) when PyTorch sees no CUDA device."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device is visible to PyTorch; run this on a machine with an "
              "NVIDIA GPU (see kernels/README.md).", file=sys.stderr)
        return None
    kernels = loader.load_cuda_kernels(torch.device("cuda"), "on")
    props = torch.cuda.get_device_properties(0)
    copy = device_copy_gbs()
    return kernels, copy, (f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
                           f"d2d copy {copy:.0f} GB/s (read+write)")


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size; 0 on the CPU."""
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def timed_us(fn: Callable[[T], object], items: Sequence[T], rounds: int, device: str = "cuda") -> float:
    """Eager microseconds per call of fn(item), rotating over `items` (so none stays in L2)."""
    for item in items:
        fn(item)
    if device == "cpu":
        started = time.perf_counter()
        for _ in range(rounds):
            for item in items:
                fn(item)
        return (time.perf_counter() - started) * 1e6 / (rounds * len(items))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        for item in items:
            fn(item)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * len(items))
