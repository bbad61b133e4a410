"""The batched multi-LoRA step: every token of a step gets its own adapter's delta.

One op serves CPU and GPU. A step's tokens are laid out so that each adapter's tokens form
one contiguous segment (the runner sorts rows by adapter slot), which lets the CPU path use
plain matmuls on views (SGMV-style: one GEMM pair per distinct adapter in the step, never per
adapter loaded) and lets the CUDA kernel either walk segments (prefill) or tokens (decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the CUDA side is imported lazily: the CPU path never loads the driver
    from ..kernels.loader import LoraKernels
    from .ops_cuda import CudaStep, SlotPointers


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step all use adapter slot `slot` (>= 0)."""

    start: int
    end: int
    slot: int


@dataclass(frozen=True)
class OneTokenRows:
    """The step's one-token rows (decode) that use an adapter, laid out for two batched matmuls.

    They are tokens [start, end), ordered by slot. Row i goes to position `index[i]` of a
    [groups, per_group] grid; group g multiplies by the pool's slot `first + g` (the slots in
    use form a compact range: the weights are a view, nothing is copied) or, when the slots in
    use are spread out, by slot `gather[g]` (each distinct adapter's weights copied once).
    """

    start: int
    end: int
    groups: int
    per_group: int
    first: int
    gather: torch.Tensor | None  # [groups] int64 slots, or None for the range first..first+groups
    index: torch.Tensor | None  # [end - start] int64 grid positions, or None when row i is at i

    @classmethod
    def build(cls, start: int, slots: list[int]) -> "OneTokenRows":
        distinct = sorted(set(slots))
        first, span = distinct[0], distinct[-1] - distinct[0] + 1
        in_range = span <= MAX_RANGE_PER_ADAPTER * len(distinct)
        group = {s: s - first for s in distinct} if in_range else {s: g for g, s in enumerate(distinct)}
        groups = span if in_range else len(distinct)
        per_group = max(slots.count(s) for s in distinct)
        index, seen = [], {}
        for s in slots:
            index.append(group[s] * per_group + seen.get(s, 0))
            seen[s] = seen.get(s, 0) + 1
        identity = index == list(range(len(slots))) and groups * per_group == len(slots)
        return cls(start, start + len(slots), groups, per_group, first,
                   None if in_range else torch.tensor(distinct, dtype=torch.long),
                   None if identity else torch.tensor(index, dtype=torch.long))


MIN_GATHERED = 4  # below this many one-token rows, per-segment matmuls are as cheap
# Slots in use spanning at most this many slots per distinct adapter are read in place (a view of
# the pool, empty or idle slots included); wider spreads copy each distinct adapter once instead.
MAX_RANGE_PER_ADAPTER = 2


@dataclass
class LoraBatch:
    """Which adapter each token of one step uses: the step's LoRA plan, built once by the model
    runner and read by every LoRA layer."""

    segments: list[Segment]
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter; on the model's device
    num_tokens: int
    one_token_rows: OneTokenRows | None = None  # None when fewer than MIN_GATHERED
    cuda: CudaStep | None = None  # the kernels' per-step arrays and launch plans (CUDA with kernels)

    @classmethod
    def from_token_slots(cls, slots: Sequence[int] | np.ndarray, device: torch.device | str = "cpu",
                         one_token_rows: int = 0, kernels: LoraKernels | None = None,
                         max_rank: int = 0) -> "LoraBatch":
        """Build from per-token slots; equal neighbours are merged into segments.

        The first `one_token_rows` tokens are rows of one token each (decode rows, ordered by slot,
        base-model rows first); no segment crosses that boundary. With `kernels` (a CUDA device),
        the kernels' per-step arrays are uploaded here, once, for ranks up to `max_rank`.
        """
        slots = np.asarray(slots, dtype=np.int64)
        cuts = np.flatnonzero(np.diff(slots)) + 1
        if 0 < one_token_rows < len(slots):
            cuts = np.union1d(cuts, [one_token_rows])
        bounds = np.concatenate(([0], cuts, [len(slots)])).tolist()
        segments = [Segment(a, b, int(slots[a])) for a, b in zip(bounds[:-1], bounds[1:]) if a < b and slots[a] >= 0]
        decode = slots[:one_token_rows]
        with_adapter = int(np.argmax(decode >= 0)) if (decode >= 0).any() else one_token_rows  # base rows first
        rows = OneTokenRows.build(with_adapter, decode[with_adapter:].tolist()) \
            if one_token_rows - with_adapter >= MIN_GATHERED else None
        token_slots = torch.from_numpy(slots.astype(np.int32)).to(device, non_blocking=True)
        batch = cls(segments=segments, token_slots=token_slots, num_tokens=len(slots), one_token_rows=rows)
        if kernels is not None:
            from .ops_cuda import CudaStep  # imported here: the CPU path never loads the driver

            batch.cuda = CudaStep.build(batch, torch.device(device), kernels, max_rank)
        return batch


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
    # The CUDA path's device arrays of slot addresses and ranks, built on first use after a change.
    cuda_pointers: SlotPointers | None = field(default=None, init=False, repr=False, compare=False)
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
        self.cuda_pointers = None
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
    With the step's kernels (CUDA), one shrink and one expand launch serve all adapters. Otherwise
    (CPU, or kernels off), the step's one-token rows (decode) share one batched matmul pair over a
    grid (BGMV-style, see OneTokenRows) when the table's slots share a rank; longer segments
    (prefill) get one matmul pair each, on views.
    """
    if batch.cuda is not None and batch.cuda.supports(y, x):
        batch.cuda.apply(y, x, table)
        return
    segments = batch.segments
    rows = batch.one_token_rows
    if rows is not None and not y.is_cuda and (pool := table.cpu_pool()) is not None:
        _one_token_rows(y, x, pool, rows)
        segments = [seg for seg in segments if seg.start >= rows.end]
    for seg in segments:
        a = table.a[seg.slot]
        if a is None:
            continue
        b = table.b[seg.slot]
        y[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ a, b)


def _one_token_rows(y: torch.Tensor, x: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor],
                    rows: OneTokenRows) -> None:
    """BGMV-style: one bmm per direction for all decode rows, over [groups, per_group] grids."""
    xs = x[rows.start:rows.end]
    if rows.index is not None:
        # Grid cells without a row stay uninitialised: a row's result depends on that row alone,
        # and only the rows' results are read back.
        xs = xs.new_empty(rows.groups * rows.per_group, xs.shape[1]).index_copy_(0, rows.index, xs)
    if rows.gather is None:
        a, b = pool[0][rows.first:rows.first + rows.groups], pool[1][rows.first:rows.first + rows.groups]
    else:
        a, b = pool[0].index_select(0, rows.gather), pool[1].index_select(0, rows.gather)
    out = torch.bmm(torch.bmm(xs.view(rows.groups, rows.per_group, -1), a), b).view(-1, b.shape[2])
    y[rows.start:rows.end].add_(out if rows.index is None else out.index_select(0, rows.index))
