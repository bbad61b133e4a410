"""The adapters' weights as the LoRA layers hold them: one slot table per (layer, target).

A table is indexed by device slot and points at each adapter's own (packed) weights; nothing is
padded or copied. Every change goes through `set_slot`, which bumps the table's `version`: each
backend keeps what it derives from a table (addresses, device arrays) in its own cache, keyed by
that version, so this module knows nothing of CPU or CUDA.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)  # identity equality and hashing: the backends' caches are keyed by the table
class LoraWeightTable:
    """The adapters' weights for one (layer, projection), indexed by device slot.

    `a[slot]` is A transposed, [h_in, r]; `b[slot]` is B transposed with the adapter's scale
    folded in, [r, h_out]; None where the slot is empty or the adapter does not target this
    projection. Ranks differ per slot and nothing is padded or copied: the slots point at the
    adapter's own (packed) weights.
    """

    h_in: int
    h_out: int
    num_slots: int
    a: list[torch.Tensor | None] = field(default_factory=list)
    b: list[torch.Tensor | None] = field(default_factory=list)
    version: int = field(default=0, init=False)  # bumped by every set_slot

    def __post_init__(self) -> None:
        if not self.a:
            self.a = [None] * self.num_slots
            self.b = [None] * self.num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """The only way to change a slot: what the backends built from the old weights is rebuilt on next use."""
        self.a[slot] = a
        self.b[slot] = b
        self.version += 1


@dataclass
class SlotPointers:
    """Per-slot addresses and ranks of one table; `keep` holds what they point to."""

    a_ptrs: list[int]
    b_ptrs: list[int]
    ranks: list[int]
    max_rank: int
    keep: list[torch.Tensor]


def slot_pointers(table: LoraWeightTable, device: torch.device, dtype: torch.dtype) -> SlotPointers:
    """Addresses of each slot's A^T [h_in, r] and B^T [r, h_out]; 0 and rank 0 for empty slots.

    Weights that are not contiguous are copied once (and kept alive here) because the native op
    and the kernels read them as dense row-major blocks.
    """
    a_ptrs, b_ptrs, ranks = [0] * table.num_slots, [0] * table.num_slots, [0] * table.num_slots
    keep: list[torch.Tensor] = []
    for slot in range(table.num_slots):
        a, b = table.a[slot], table.b[slot]
        if a is None or b is None:
            continue
        r = a.shape[1] if a.dim() == 2 else -1
        if a.shape != (table.h_in, r) or b.shape != (r, table.h_out) or r < 1:
            raise ValueError(f"LoRA slot {slot}: a {tuple(a.shape)} / b {tuple(b.shape)} do not "
                             f"match [h_in={table.h_in}, r] / [r, h_out={table.h_out}]")
        for name, w in (("a", a), ("b", b)):
            if w.device != device or w.dtype != dtype:
                raise ValueError(f"LoRA slot {slot}: {name} is {w.dtype} on {w.device}, "
                                 f"the activations are {dtype} on {device}")
        a, b = a.contiguous(), b.contiguous()
        keep += [a, b]
        a_ptrs[slot], b_ptrs[slot], ranks[slot] = a.data_ptr(), b.data_ptr(), r
    return SlotPointers(a_ptrs, b_ptrs, ranks, max(ranks, default=0), keep)


@dataclass(frozen=True)
class LoraTarget:
    """One PEFT target inside a projection's output: columns [start, end) and its slot table."""

    name: str
    start: int
    end: int
    table: LoraWeightTable


class LoraTargets:
    """The targets of one projection (they share its input x: q/k/v, gate/up), applied in one call."""

    def __init__(self, targets: Sequence[LoraTarget]) -> None:
        self.targets = tuple(targets)

    @property
    def versions(self) -> tuple[int, ...]:
        """The targets' table versions: what a backend's cache of this projection is valid for."""
        return tuple(t.table.version for t in self.targets)
