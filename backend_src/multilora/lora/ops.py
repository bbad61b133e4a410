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
    # CPU: every slot's A and B stacked, [S, h_in, r] and [S, r, h_out], while all share one rank.
    _pool: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.a:
            self.a = [None] * self.num_slots
            self.b = [None] * self.num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """The only way to change a slot: it also invalidates the CUDA path's pointer tables."""
        self.a[slot] = a
        self.b[slot] = b
        self.device_cache.clear()
        if self._pool is None:
            return
        with torch.inference_mode():  # the pool was made inside the runner's inference mode
            if a is None:
                self._pool[0][slot].zero_()
                self._pool[1][slot].zero_()
            elif a.shape[1] == self._pool[0].shape[2]:
                self._pool[0][slot].copy_(a)  # same rank: update the stacked copy in place
                self._pool[1][slot].copy_(b)
            else:
                self._pool = None  # rebuilt on next use (or not at all, if ranks now differ)

    def cpu_pool(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every slot's weights stacked for batched matmuls, if all slots share one rank.

        Mixed ranks get None (per-segment matmuls), rather than padding small ranks to the largest.
        """
        if self._pool is None:
            present = [(a, b) for a, b in zip(self.a, self.b) if a is not None]
            ranks = {a.shape[1] for a, _ in present}
            if len(ranks) != 1:
                return None
            r = ranks.pop()
            like = dict(dtype=present[0][0].dtype, device=present[0][0].device)
            pool_a = torch.zeros(self.num_slots, self.h_in, r, **like)
            pool_b = torch.zeros(self.num_slots, r, self.h_out, **like)
            for slot, (a, b) in enumerate(zip(self.a, self.b)):
                if a is not None:
                    pool_a[slot].copy_(a)
                    pool_b[slot].copy_(b)
            self._pool = (pool_a, pool_b)
        return self._pool


def apply_lora(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable, batch: LoraBatch) -> None:
    """y[t] += x[t] @ a[slot[t]] @ b[slot[t]] for every token with an adapter, in place.

    x: [T, h_in]; y: [T, h_out] (may be a column slice of a fused projection's output).
    CUDA tensors go to the kernels (one shrink + one expand launch for all adapters) when their
    layout allows. On CPU, tokens of short segments (decode rows) share one gathered batched
    matmul pair when the table's slots share a rank; long segments (prefill) get one matmul pair
    each, on views.
    """
    if y.is_cuda:
        from multilora.lora import ops_cuda  # imported here: the CPU path never loads the driver

        if ops_cuda.kernels_support(y, x):
            ops_cuda.apply_lora_cuda(y, x, table, batch)
            return
    segments = batch.segments
    singles = None if y.is_cuda else _single_tokens(batch)
    if singles is not None and (pool := table.cpu_pool()) is not None:
        tokens, slots = singles  # BGMV: one batched matmul pair for all tokens of short segments
        v = torch.bmm(x.index_select(0, tokens).unsqueeze(1), pool[0].index_select(0, slots))  # [n, 1, r]
        y.index_add_(0, tokens, torch.bmm(v, pool[1].index_select(0, slots)).squeeze(1))
        segments = [seg for seg in segments if seg.end - seg.start > SHORT]
    for seg in segments:
        a = table.a[seg.slot]
        if a is None:
            continue
        b = table.b[seg.slot]
        y[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ a, b)


SHORT = 4  # segments up to this many tokens (decode rows) take the gathered path
MIN_SINGLES = 4  # below this many such tokens, per-segment matmuls are as cheap


def _single_tokens(batch: LoraBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Token and slot indices of the tokens in short segments (decode rows), cached per step.

    Many short segments cost one small matmul pair each; gathering their slots' weights from the
    stacked pool and running one batched matmul pair measured faster on CPU (docs/design.md)."""
    if "singles" not in batch.device_cache:
        singles = [(t, seg.slot) for seg in batch.segments if seg.end - seg.start <= SHORT
                   for t in range(seg.start, seg.end)]
        batch.device_cache["singles"] = (torch.tensor([t for t, _ in singles]), torch.tensor([s for _, s in singles])) \
            if len(singles) >= MIN_SINGLES else None
    return batch.device_cache["singles"]
