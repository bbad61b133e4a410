"""Giving memory freed by adapter evictions back to the operating system."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory freed by evictions back to the OS.

    glibc raises its mmap threshold after large frees, so later adapter buffers come from the heap,
    whose freed pages it keeps: without a trim the process grows with every adapter that passes
    through the cache, although it holds no more of them (measured in bench/adapter_scale.py).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
