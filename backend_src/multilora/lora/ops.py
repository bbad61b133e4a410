"""The batched multi-LoRA step: every token of a step gets its own adapter's delta.

One op serves CPU and GPU. A step's tokens are laid out so that each adapter's tokens form
one contiguous segment (the runner sorts rows by adapter slot), which lets the CPU path use
plain matmuls on views (SGMV-style: one GEMM pair per distinct adapter in the step, never per
adapter loaded) and lets the CUDA kernel either walk segments (prefill) or tokens (decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step all use adapter slot `slot` (>= 0)."""

    start: int
    end: int
    slot: int


@dataclass
class LoraBatch:
    """Which adapter each token of one step uses; built once per step, shared by all layers."""

    segments: list[Segment]
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter; on the model's device
    num_tokens: int
    # Per-step tensors the CUDA path derives once and shares across layers (see ops_cuda).
    device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_token_slots(cls, slots: list[int], device: torch.device | str = "cpu") -> "LoraBatch":
        """Build from per-token slots; equal neighbours are merged into segments."""
        segments: list[Segment] = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                if slots[start] >= 0:
                    segments.append(Segment(start, i, slots[start]))
                start = i
        token_slots = torch.tensor(slots, dtype=torch.int32, device=device)
        return cls(segments=segments, token_slots=token_slots, num_tokens=len(slots))


@dataclass
class LoraWeightTable:
    """The adapters' weights for one (layer, projection), indexed by device slot.

    `a[slot]` is A transposed, [h_in, r]; `b[slot]` is B transposed with the adapter's scale
    folded in, [r, h_out]; None where the slot is empty or the adapter does not target this
    projection. Ranks differ per slot and nothing is padded.
    """

    h_in: int
    h_out: int
    num_slots: int
    a: list[torch.Tensor | None] = field(default_factory=list)
    b: list[torch.Tensor | None] = field(default_factory=list)
    # Device pointer/rank tables of the CUDA path, built lazily; set_slot drops them.
    device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.a:
            self.a = [None] * self.num_slots
            self.b = [None] * self.num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """The only way to change a slot: it also invalidates the CUDA path's pointer tables."""
        self.a[slot] = a
        self.b[slot] = b
        self.device_cache.clear()


def apply_lora(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable, batch: LoraBatch) -> None:
    """y[t] += x[t] @ a[slot[t]] @ b[slot[t]] for every token with an adapter, in place.

    x: [T, h_in]; y: [T, h_out] (may be a column slice of a fused projection's output).
    CUDA tensors go to the kernels (one shrink + one expand launch for all adapters) when their
    layout allows; everything else takes the per-segment matmuls below.
    """
    if y.is_cuda:
        from multilora.lora import ops_cuda  # imported here: the CPU path never loads the driver

        if ops_cuda.kernels_support(y, x):
            ops_cuda.apply_lora_cuda(y, x, table, batch)
            return
    for seg in batch.segments:
        a = table.a[seg.slot]
        if a is None:
            continue
        b = table.b[seg.slot]
        y[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ a, b)
