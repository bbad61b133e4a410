"""Copy bandwidth, the ceiling a memory-bound step is compared with: of this machine's memory (as
torch's CPU copy sees it) and of a GPU (device to device). Both count bytes read plus written."""
from __future__ import annotations

import time

import torch


def host_copy_gbs(size_mb: int = 512) -> float:
    """GB/s of a CPU tensor copy, best of a few (read + write)."""
    src = torch.ones(size_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


def device_copy_gbs(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """GB/s of a device-to-device copy on the current GPU (read + write), timed with CUDA events."""
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
