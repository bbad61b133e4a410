"""The CPU backend: the fused native op (lora/native/lora_cpu.cpp), planned once per step.

One op call per projection does all its targets, with one pass over each distinct adapter's
weights. CpuStep is the step's plan: the tokens that have an adapter, grouped by slot, cut into
work items of at most MAX_ITEM_TOKENS tokens (largest first, so the threads that take items one by
one end together); the native plan groups tokens by slot itself, so any layout works.
NativeWeights is one projection's table of slot addresses and ranks, per target, which the backend
caches per projection and rebuilds only after a slot changed (the tables' versions); the op reads
the adapters' weights where they are. A call the op does not take (see `supports`) runs on the
PyTorch reference instead. The backend runs one ISA level of the op (`isa`, chosen once when it is
built: lora/native's choose_isa).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from .. import native
from ..plan import LoraBatch
from ..weights import LoraTarget, LoraTargets, slot_pointers
from .torch import TorchBackend

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
    def build(cls, targets: Sequence[LoraTarget]) -> NativeWeights:
        ptrs = [slot_pointers(t.table, torch.device("cpu"), torch.float32) for t in targets]
        columns = torch.tensor([[t.start, t.end - t.start, t.table.h_in] for t in targets], dtype=torch.int64)
        weights = torch.tensor([list(zip(p.a_ptrs, p.b_ptrs, p.ranks)) for p in ptrs], dtype=torch.int64)
        held = {id(w) for t in targets for w in (*t.table.a, *t.table.b) if w is not None}
        return cls(columns, weights.view(len(targets), -1, 3),
                   [w for p in ptrs for w in p.keep if id(w) not in held])


@dataclass(frozen=True)
class CpuStep:
    batch: LoraBatch  # the segments, for the calls the op does not take
    rows: torch.Tensor  # [N] int32: the tokens that have an adapter, grouped by slot
    items: torch.Tensor  # [I, 3] int32: slot, first index into rows, count

    @classmethod
    def build(cls, batch: LoraBatch) -> CpuStep:
        slots = batch.token_slots.numpy()  # on the CPU: the op's models live there
        tokens = np.flatnonzero(slots >= 0)
        tokens = tokens[np.argsort(slots[tokens], kind="stable")]
        grouped = slots[tokens]
        starts = np.flatnonzero(np.diff(grouped, prepend=-1)).tolist()
        items = [(int(grouped[start]), first, min(MAX_ITEM_TOKENS, end - first))
                 for start, end in zip(starts, starts[1:] + [len(tokens)])
                 for first in range(start, end, MAX_ITEM_TOKENS)]
        items.sort(key=lambda item: -item[2])
        return cls(batch, torch.from_numpy(tokens.astype(np.int32)),
                   torch.tensor(items, dtype=torch.int32).view(-1, 3))


def supports(y: torch.Tensor, x: torch.Tensor) -> bool:
    """float32 CPU matrices with unit column stride; other calls take the PyTorch reference."""
    return (y.dtype == x.dtype == torch.float32 and y.device.type == x.device.type == "cpu"
            and y.dim() == x.dim() == 2 and y.stride(1) == 1 and x.stride(1) == 1)


class CpuBackend:
    name = "cpu"

    @staticmethod
    def takes(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the op serves a model on `device` in `dtype`: float32 on the CPU."""
        return device.type == "cpu" and dtype == torch.float32

    def __init__(self, op: ModuleType, isa: str | None = None) -> None:
        """`isa`: the op's ISA level (v4, v3, baseline); None: $MULTILORA_CPU_ISA, else the best this
        CPU runs. A level the CPU lacks raises ConfigError."""
        self.op = op
        self.isa = native.choose_isa(op, isa)
        self.reference = TorchBackend()
        # Per projection: its tables' versions and the op's weights built from them.
        self._weights: weakref.WeakKeyDictionary[LoraTargets, tuple[tuple[int, ...], NativeWeights]] = (
            weakref.WeakKeyDictionary())

    def native_weights(self, targets: LoraTargets) -> NativeWeights:
        """The op's table of the targets' slots, rebuilt only after one of their slots changed."""
        versions = targets.versions
        cached = self._weights.get(targets)
        if cached is None or cached[0] != versions:
            cached = self._weights[targets] = (versions, NativeWeights.build(targets.targets))
        return cached[1]

    def plan_step(self, batch: LoraBatch) -> CpuStep:
        return CpuStep.build(batch)

    def apply(self, y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, plan: CpuStep) -> None:
        """All the projection's targets in one op call (x: [T, h_in]; y: [T, out], in place)."""
        if not supports(y, x):
            self.reference.apply(y, x, targets, plan.batch)
            return
        weights = self.native_weights(targets)
        self.op.apply(y, x, weights.columns, weights.weights, plan.rows, plan.items, self.isa)
