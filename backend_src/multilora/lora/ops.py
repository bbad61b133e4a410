"""The batched multi-LoRA step: every token of a step gets its own adapter's delta.

One op, three paths, chosen per call from the step's plan (LoraBatch, built once per step):
- CPU: the fused native op (lora/native, built by `make install`; ops_cpu.py plans it): one call
  per projection for all its targets, one pass over each distinct adapter's weights.
- CUDA with the kernels: one shrink and one expand launch per target (ops_cuda.py).
- Otherwise (the op not built, a dtype it does not take, CUDA with kernels off): PyTorch, one
  matmul pair per segment on views. It is also the reference the other two are tested against.
A step's tokens are laid out so that each adapter's tokens form contiguous segments (the runner
sorts rows by adapter slot); the native plan groups tokens by slot itself, so any layout works.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import native

if TYPE_CHECKING:  # the CUDA side is imported lazily: the CPU path never loads the driver
    from ..cuda.module import CudaKernels
    from .ops_cpu import CpuStep, NativeWeights
    from .ops_cuda import CudaStep


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step all use adapter slot `slot` (>= 0)."""

    start: int
    end: int
    slot: int


@dataclass
class LoraBatch:
    """Which adapter each token of one step uses: the step's LoRA plan, built once by the model
    runner and read by every LoRA layer."""

    segments: list[Segment]
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter; on the model's device
    num_tokens: int
    cuda: CudaStep | None = None  # the kernels' per-step arrays and launch plans (CUDA with kernels)
    cpu: CpuStep | None = None  # the native op's per-step arrays (CPU with the op built)

    @classmethod
    def from_token_slots(cls, slots: Sequence[int] | np.ndarray, device: torch.device | str = "cpu",
                         num_decode_tokens: int = 0, kernels: CudaKernels | None = None,
                         max_rank: int = 0) -> "LoraBatch":
        """Build from per-token slots; equal neighbours are merged into segments.

        The first `num_decode_tokens` tokens are the decode rows' (one token each); no segment
        crosses that boundary. With `kernels` (a CUDA device), the kernels' per-step arrays are
        uploaded here, once, for ranks up to `max_rank`; on the CPU, the native op's plan is made.
        """
        slots = np.asarray(slots, dtype=np.int64)
        cuts = np.flatnonzero(np.diff(slots)) + 1
        if 0 < num_decode_tokens < len(slots):
            cuts = np.union1d(cuts, [num_decode_tokens])
        bounds = np.concatenate(([0], cuts, [len(slots)])).tolist()
        segments = [Segment(a, b, int(slots[a])) for a, b in zip(bounds[:-1], bounds[1:]) if a < b and slots[a] >= 0]
        token_slots = torch.from_numpy(slots.astype(np.int32)).to(device, non_blocking=True)
        batch = cls(segments=segments, token_slots=token_slots, num_tokens=len(slots))
        if kernels is not None:
            from .ops_cuda import CudaStep  # imported here: the CPU path never loads the driver

            batch.cuda = CudaStep.build(batch, torch.device(device), kernels, max_rank)
        elif torch.device(device).type == "cpu" and (op := native.load()) is not None:
            from .ops_cpu import CpuStep

            batch.cpu = CpuStep.build(slots, op)
        return batch


@dataclass
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
    # The CUDA path's device arrays of slot addresses and ranks, built on first use after a change.
    cuda_pointers: SlotPointers | None = field(default=None, init=False, repr=False, compare=False)
    version: int = field(default=0, init=False, compare=False)  # bumped by every set_slot

    def __post_init__(self) -> None:
        if not self.a:
            self.a = [None] * self.num_slots
            self.b = [None] * self.num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """The only way to change a slot: what was built from the old weights is rebuilt on next use."""
        self.a[slot] = a
        self.b[slot] = b
        self.cuda_pointers = None
        self.version += 1


@dataclass
class SlotPointers:
    """Per-slot addresses and ranks of one table; `keep` holds what they point to."""

    a_ptrs: list[int]
    b_ptrs: list[int]
    ranks: list[int]
    max_rank: int
    keep: list[torch.Tensor]
    device_arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # a_ptrs, b_ptrs, ranks (CUDA)


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
    """The targets of one projection (they share its input x: q/k/v, gate/up), applied in one call.

    Also holds the native op's table of their slots' weights, rebuilt when a slot changed.
    """

    def __init__(self, targets: Sequence[LoraTarget]) -> None:
        self.targets = tuple(targets)
        self._native: tuple[tuple[int, ...], NativeWeights] | None = None

    def native_weights(self) -> NativeWeights:
        versions = tuple(t.table.version for t in self.targets)
        if self._native is None or self._native[0] != versions:
            from .ops_cpu import NativeWeights

            self._native = (versions, NativeWeights.build(self.targets))
        return self._native[1]


def apply_lora(y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, batch: LoraBatch) -> None:
    """y[t, target columns] += x[t] @ a[slot[t]] @ b[slot[t]] for every target and every token
    with an adapter, in place. x: [T, h_in]; y: [T, out], the projection's output (or a slice)."""
    if batch.cpu is not None and batch.cpu.supports(y, x):
        batch.cpu.apply(y, x, targets.native_weights())
        return
    for target in targets.targets:
        out = y[:, target.start:target.end]
        if batch.cuda is not None and batch.cuda.supports(out, x):
            batch.cuda.apply(out, x, target.table)
        else:
            apply_segments(out, x, target.table, batch.segments)


def apply_segments(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable, segments: list[Segment]) -> None:
    """The PyTorch path: y[seg] += (x[seg] @ A) @ B, one matmul pair per segment, on views."""
    for seg in segments:
        a = table.a[seg.slot]
        if a is None:
            continue
        y[seg.start:seg.end].addmm_(x[seg.start:seg.end] @ a, table.b[seg.slot])
