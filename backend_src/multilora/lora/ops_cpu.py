"""The CPU path of apply_lora: the fused native op (lora/native/lora_cpu.cpp), planned once per step.

CpuStep is the step's plan: the tokens that have an adapter, grouped by slot, cut into work items
of at most MAX_ITEM_TOKENS tokens (largest first, so the threads that take items one by one end
together). NativeWeights is one projection's table of slot addresses and ranks, per target,
rebuilt only after a slot changed; the op reads the adapters' weights where they are.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from .ops import LoraTarget, slot_pointers

# A slot's tokens are cut into items of at most this many, so one long prefill segment still
# spreads over the threads; each item reads the adapter's weights again, from cache.
MAX_ITEM_TOKENS = 16


@dataclass(frozen=True)
class NativeWeights:
    """One projection's targets for the op: columns [targets, 3] (first column, h_out, h_in) and
    weights [targets, slots, 3] (A address, B address, rank; 0 for an empty slot)."""

    columns: torch.Tensor
    weights: torch.Tensor
    keep: list[torch.Tensor]  # copies of weights that were not contiguous (the tables hold the rest)

    @classmethod
    def build(cls, targets: Sequence[LoraTarget]) -> "NativeWeights":
        ptrs = [slot_pointers(t.table, torch.device("cpu"), torch.float32) for t in targets]
        columns = torch.tensor([[t.start, t.end - t.start, t.table.h_in] for t in targets], dtype=torch.int64)
        weights = torch.tensor([list(zip(p.a_ptrs, p.b_ptrs, p.ranks)) for p in ptrs], dtype=torch.int64)
        held = {id(w) for t in targets for w in (*t.table.a, *t.table.b) if w is not None}
        return cls(columns, weights.view(len(targets), -1, 3),
                   [w for p in ptrs for w in p.keep if id(w) not in held])


@dataclass(frozen=True)
class CpuStep:
    rows: torch.Tensor  # [N] int32: the tokens that have an adapter, grouped by slot
    items: torch.Tensor  # [I, 3] int32: slot, first index into rows, count
    op: ModuleType

    @classmethod
    def build(cls, slots: np.ndarray, op: ModuleType) -> "CpuStep":
        tokens = np.flatnonzero(slots >= 0)
        tokens = tokens[np.argsort(slots[tokens], kind="stable")]
        grouped = slots[tokens]
        starts = np.flatnonzero(np.diff(grouped, prepend=-1)).tolist()
        items = [(int(grouped[start]), first, min(MAX_ITEM_TOKENS, end - first))
                 for start, end in zip(starts, starts[1:] + [len(tokens)])
                 for first in range(start, end, MAX_ITEM_TOKENS)]
        items.sort(key=lambda item: -item[2])
        return cls(torch.from_numpy(tokens.astype(np.int32)),
                   torch.tensor(items, dtype=torch.int32).view(-1, 3), op)

    @staticmethod
    def supports(y: torch.Tensor, x: torch.Tensor) -> bool:
        """float32 CPU matrices with unit column stride; other calls take the PyTorch path."""
        return (y.dtype == x.dtype == torch.float32 and y.device.type == x.device.type == "cpu"
                and y.dim() == x.dim() == 2 and y.stride(1) == 1 and x.stride(1) == 1)

    def apply(self, y: torch.Tensor, x: torch.Tensor, weights: NativeWeights) -> None:
        self.op.apply(y, x, weights.columns, weights.weights, self.rows, self.items)
