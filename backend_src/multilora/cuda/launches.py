"""Kernel launches in two forms: the plan (`Launch`: grid, block, argument values and types, checked
against the kernel's signature) and the same launch packed once into C memory (`PackedLaunch`), as
cuLaunchKernel reads its arguments.

Why pack: cuda.bindings packs a (values, types) pair anew at every cuLaunchKernel, tens of
microseconds a launch in Python. A step packs each planned launch once; between layers only the
arguments that differ (each layer's x, y, descriptor, caches) are written in place, and the driver
gets the address of the argument array. A captured CUDA graph copies the arguments at capture, so
the packed memory may change after it.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

Signature = tuple[tuple[str, str], ...]  # (argument name, kind) in .cu order
# kinds: p = pointer, i = int, l = long long, f = float
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


def pack(family: str, sig: Signature, values: dict[str, int | float]) -> tuple[tuple, tuple[type, ...]]:
    """The (values, types) pair of a launch, in the order of the kernel's signature.

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


@cache
def _struct_type(sig: Signature) -> type[ctypes.Structure]:
    """A C struct with one field per argument: each field has its C type's own alignment, which is
    all cuLaunchKernel asks of the memory an argument pointer points to."""
    return type("KernelArgs", (ctypes.Structure,), {"_fields_": [(name, _CTYPES[kind]) for name, kind in sig]})


class PackedLaunch:
    """A planned Launch packed once: `address` is its void*[] of argument addresses (what
    cuLaunchKernel's kernelParams takes as an int); `set` rewrites one argument in place."""

    __slots__ = ("kernel", "grid", "block", "address", "names", "keep", "_args", "_sig", "_pointers")

    def __init__(self, launch: Launch, sig: Signature) -> None:
        struct = _struct_type(sig)
        self.kernel, self.grid, self.block, self._sig = launch.kernel, launch.grid, launch.block, sig
        self.names = frozenset(name for name, _ in sig)
        self.keep: object = None  # what the arguments address, held as long as the launch is
        self._args = struct(*launch.params[0])
        base = ctypes.addressof(self._args)
        self._pointers = (ctypes.c_void_p * len(sig))(*(base + getattr(struct, name).offset for name, _ in sig))
        self.address = ctypes.addressof(self._pointers)

    def set(self, name: str, value: int) -> None:
        """One argument's new value (an address or a stride; the plan checked the others' ranges)."""
        setattr(self._args, name, value)

    @property
    def params(self) -> tuple[tuple, tuple[type, ...]]:
        """The current arguments as a (values, types) pair, as Launch holds them (for checks and tests)."""
        values = tuple(getattr(self._args, name) or 0 for name, _ in self._sig)  # a NULL c_void_p reads None
        return values, tuple(_CTYPES[kind] for _, kind in self._sig)
