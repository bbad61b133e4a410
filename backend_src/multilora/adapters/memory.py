"""Adapters' host memory: the buffers that hold their weights, and giving freed memory back."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory freed by evictions back to the OS.

    glibc raises its mmap threshold after large frees, so later adapter buffers come from the heap,
    whose freed pages it keeps: without a trim the process grows with every adapter that passes
    through the cache, although it holds no more of them (measured in bench/adapter_scale.py).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat host buffer for one adapter's packed weights.

    From 2 MiB up it is a mapping of its own, advised for transparent huge pages: the fused CPU
    LoRA op streams every distinct adapter's weights once per step, and with 4 KiB pages each new
    page costs a TLB miss and restarts the hardware prefetcher (measured: 12-22% faster per step
    on huge pages, docs/design.md "The fused CPU LoRA op"). The mapping is returned to the OS as
    soon as the adapter's tensors are dropped. Smaller buffers come from the heap.
    """
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype, count=numel)  # keeps the mapping alive
