"""The CUDA path of apply_lora: two kernel launches (shrink, expand) for all adapters of a step.

Planned once per step (CudaStep, built by the model runner with the step's LoraBatch): the
segment arrays and token slots are uploaded once, the driver context is made current once, the
fp32 scratch `v` is allocated once, and each projection shape's grid and packed arguments are
planned at its first call; later layers only swap in their own addresses. The table's per-slot
weights stay where the adapter slots put them: the kernels find them through a device array of
addresses and a rank per slot (SlotPointers), rebuilt only after `set_slot` changed the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from multilora.cuda.driver import DTYPE_NAMES, step_stream
from multilora.cuda.lora_launch import Launch, LoraProblem, choose_variant, for_call, plan
from multilora.lora.ops import LoraBatch, LoraWeightTable, SlotPointers, slot_pointers  # ops imports us lazily

if TYPE_CHECKING:
    from multilora.cuda.module import CudaKernels


@dataclass(frozen=True)
class StepSegments:
    """A step's segments as lists, plus what the launch planning needs to know about them."""

    starts: list[int]
    ends: list[int]
    slots: list[int]
    max_len: int
    adapter_tokens: int


def table_pointers(table: LoraWeightTable, device: torch.device, dtype: torch.dtype) -> SlotPointers:
    """The table's pointers with their device arrays, built after each change of the table."""
    ptrs = table.cuda_pointers
    if ptrs is None:
        ptrs = slot_pointers(table, device, dtype)
        ptrs.device_arrays = (torch.tensor(ptrs.a_ptrs, dtype=torch.int64, device=device),
                              torch.tensor(ptrs.b_ptrs, dtype=torch.int64, device=device),
                              torch.tensor(ptrs.ranks, dtype=torch.int32, device=device))
        table.cuda_pointers = ptrs
    return ptrs


def step_segments(batch: LoraBatch) -> StepSegments:
    """Segment bounds and slots as lists, the longest segment, and tokens that have an adapter."""
    segs = batch.segments
    return StepSegments(
        starts=[s.start for s in segs], ends=[s.end for s in segs], slots=[s.slot for s in segs],
        max_len=max((s.end - s.start for s in segs), default=0),
        adapter_tokens=sum(s.end - s.start for s in segs))


def supported_layout(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernels can take this call (dtype, device, row-major rows); else the matmul path."""
    return (y.dtype in DTYPE_NAMES and x.dtype == y.dtype and x.device == y.device
            and x.dim() == 2 and y.dim() == 2 and x.shape[0] == y.shape[0]
            and (x.stride(1) == 1 or x.shape[1] == 1) and (y.stride(1) == 1 or y.shape[1] == 1))


@dataclass
class CudaStep:
    """The kernels' view of one step; `apply` is the per-layer call."""

    segments: StepSegments
    variant: str
    token_slots: torch.Tensor  # [T] int32 on the device
    seg_arrays: torch.Tensor  # [3, S] int32: starts, ends, slots
    num_tokens: int
    sm_count: int
    kernels: CudaKernels | None = None  # None: plan only (tests run the plans on a CPU emulation)
    stream: int = 0
    v: torch.Tensor | None = None  # fp32 scratch, [T * max rank]
    _plans: dict[tuple, list[Launch]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, batch: LoraBatch, device: torch.device, kernels: CudaKernels | None, max_rank: int = 0,
              sm_count: int | None = None) -> "CudaStep":
        segs = step_segments(batch)
        step = cls(
            segments=segs, variant=choose_variant(segs.adapter_tokens, len(segs.slots)),
            token_slots=batch.token_slots.to(device=device, dtype=torch.int32),
            seg_arrays=torch.tensor([segs.starts, segs.ends, segs.slots], dtype=torch.int32).to(device),
            num_tokens=batch.num_tokens, sm_count=sm_count if sm_count is not None else kernels.sm_count,
            kernels=kernels,
            stream=step_stream(kernels, device))
        if max_rank:
            step.v = torch.empty(batch.num_tokens * max_rank, dtype=torch.float32, device=device)
        return step

    def supports(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        return self.kernels is not None and supported_layout(y, x)

    def launches(self, y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable) -> tuple[list[Launch], list]:
        """The shrink and expand launches of one call, and every tensor they address (hold it until
        the launches are enqueued). Device-agnostic, so tests run it on CPU tensors too."""
        if x.shape[1] != table.h_in or y.shape[1] != table.h_out or x.shape[0] != self.num_tokens:
            raise ValueError(f"apply_lora: x {tuple(x.shape)}, y {tuple(y.shape)} do not match "
                             f"[{self.num_tokens}, h_in={table.h_in}] / [.., h_out={table.h_out}]")
        if not self.segments.slots or x.shape[0] == 0:
            return [], []
        ptrs = table_pointers(table, y.device, y.dtype)
        if ptrs.max_rank == 0:
            return [], []
        ldv = ptrs.max_rank
        needed = self.num_tokens * ldv
        if self.v is None or self.v.numel() < needed:
            self.v = torch.empty(needed, dtype=torch.float32, device=y.device)
        v = self.v[:needed]
        v.zero_()  # the shrink adds its split-k partial sums into v
        a_ptrs, b_ptrs, ranks = ptrs.device_arrays
        values = dict(x=x.data_ptr(), ldx=x.stride(0), y=y.data_ptr(), ldy=y.stride(0), v=v.data_ptr(), ldv=ldv,
                      a_ptrs=a_ptrs.data_ptr(), b_ptrs=b_ptrs.data_ptr(), ranks=ranks.data_ptr())
        key = (DTYPE_NAMES[y.dtype], table.h_in, table.h_out)
        templates = self._plans.get(key)
        if templates is None:
            templates = self._plans[key] = self._plan(key, values)
        used = [v, self.token_slots, self.seg_arrays, *ptrs.device_arrays, *ptrs.keep]
        return for_call(templates, **values), used

    def _plan(self, key: tuple, values: dict[str, int]) -> list[Launch]:
        segs = self.segments
        problem = LoraProblem(
            dtype=key[0], num_tokens=self.num_tokens, h_in=key[1], h_out=key[2],
            token_slots=self.token_slots.data_ptr(), seg_starts=self.seg_arrays[0].data_ptr(),
            seg_ends=self.seg_arrays[1].data_ptr(), seg_slots=self.seg_arrays[2].data_ptr(),
            num_segments=len(segs.slots), max_segment_len=segs.max_len, **values)
        return plan(problem, self.variant, self.sm_count)

    def apply(self, y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable) -> None:
        """y[t] += x[t] @ A_slot @ B_slot on the GPU, in place, on the step's stream."""
        launches, used = self.launches(y, x, table)
        for launch in launches:
            self.kernels.launch(launch, self.stream)
        # `used` (v above all) is released after this returns: the caching allocator hands that memory
        # only to later work on this same stream, which runs after these kernels.
        del used

