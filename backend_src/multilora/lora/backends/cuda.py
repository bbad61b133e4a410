"""The CUDA backend: our kernels, two launches (shrink, expand) per target for all adapters of a step.

Planned once per step (CudaStep, from the step's LoraBatch): the segment arrays and token slots are
uploaded once, the driver context is made current once, the fp32 scratch `v` is allocated once, and
each projection shape's grid and packed arguments are planned at its first call; later layers only
swap in their own addresses. The table's per-slot weights stay where the adapter slots put them:
the kernels find them through device arrays of addresses and ranks per slot (DevicePointers), which
the backend caches per table and rebuilds only after `set_slot` changed the table (its version).

A call the kernels cannot take (a dtype without kernels, strided columns: `supported_layout`), and
every call when the backend has no kernels (plans only, as the tests run it), goes to the PyTorch
reference instead, target by target.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from ...cuda.driver import DTYPE_NAMES, step_stream
from ...cuda.lora_launch import Launch, LoraProblem, choose_variant, for_call, plan
from ..plan import LoraBatch
from ..weights import LoraTargets, LoraWeightTable, SlotPointers, slot_pointers
from .torch import apply_segments

if TYPE_CHECKING:
    from ...cuda.module import CudaKernels


@dataclass(frozen=True)
class StepSegments:
    """A step's segments as lists, plus what the launch planning needs to know about them."""

    starts: list[int]
    ends: list[int]
    slots: list[int]
    max_len: int
    adapter_tokens: int


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


class PlanKey(NamedTuple):
    """A projection shape of one step: the calls that share it share their planned launches."""

    dtype: str  # the kernels' name of x's, y's and the weights' dtype
    h_in: int
    h_out: int


@dataclass(frozen=True)
class DevicePointers:
    """One version of a table as the kernels read it: its slots' addresses and ranks on the device."""

    version: int  # the table's version these were built from
    host: SlotPointers  # the same as host lists; max_rank, and `keep`: what the addresses point to
    a_ptrs: torch.Tensor  # [slots] int64
    b_ptrs: torch.Tensor  # [slots] int64
    ranks: torch.Tensor  # [slots] int32


@dataclass
class CudaStep:
    """The kernels' view of one step: its arrays on the device, stream, scratch and launch plans."""

    batch: LoraBatch  # the segments, for the calls the kernels do not take
    segments: StepSegments
    variant: str
    token_slots: torch.Tensor  # [T] int32 on the device
    seg_arrays: torch.Tensor  # [3, S] int32: starts, ends, slots
    stream: int = 0
    v: torch.Tensor | None = None  # fp32 scratch, [T * max rank]
    plans: dict[PlanKey, list[Launch]] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


class CudaBackend:
    name = "cuda"

    def __init__(self, kernels: CudaKernels | None, max_rank: int = 0, sm_count: int | None = None) -> None:
        """`kernels` None plans without launching (tests run the plans on a CPU emulation); then
        `sm_count` must be given. `max_rank` sizes each step's scratch up front."""
        self.kernels = kernels
        self.max_rank = max_rank
        self.sm_count = sm_count if sm_count is not None else kernels.sm_count
        self.device_pointers: weakref.WeakKeyDictionary[LoraWeightTable, DevicePointers] = weakref.WeakKeyDictionary()

    def plan_step(self, batch: LoraBatch) -> CudaStep:
        """Upload the step's arrays and make the context current, once per step, in the thread that
        runs the forward pass."""
        device = batch.token_slots.device
        stream = step_stream(self.kernels, device)
        segs = step_segments(batch)
        step = CudaStep(
            batch=batch, segments=segs, variant=choose_variant(segs.adapter_tokens, len(segs.slots)),
            token_slots=batch.token_slots.to(dtype=torch.int32),
            seg_arrays=torch.tensor([segs.starts, segs.ends, segs.slots], dtype=torch.int32).to(device),
            stream=stream)
        if self.max_rank:
            step.v = torch.empty(batch.num_tokens * self.max_rank, dtype=torch.float32, device=device)
        return step

    def apply(self, y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, plan: CudaStep) -> None:
        """y[t, target columns] += x[t] @ A_slot @ B_slot for every target, in place, on the step's stream."""
        for target in targets.targets:
            out = y[:, target.start:target.end]
            if self.kernels is None or not supported_layout(out, x):
                apply_segments(out, x, target.table, plan.batch.segments)
                continue
            launches, used = self.launches(plan, out, x, target.table)
            for launch in launches:
                self.kernels.launch(launch, plan.stream)
            # `used` (v above all) is released after the launches are enqueued: the caching allocator
            # hands that memory only to later work on this same stream, which runs after these kernels.
            del used

    def table_pointers(self, table: LoraWeightTable, device: torch.device, dtype: torch.dtype) -> DevicePointers:
        """The table's slots on the device, rebuilt only after the table changed."""
        cached = self.device_pointers.get(table)
        if cached is None or cached.version != table.version:
            host = slot_pointers(table, device, dtype)
            cached = self.device_pointers[table] = DevicePointers(
                table.version, host, torch.tensor(host.a_ptrs, dtype=torch.int64, device=device),
                torch.tensor(host.b_ptrs, dtype=torch.int64, device=device),
                torch.tensor(host.ranks, dtype=torch.int32, device=device))
        return cached

    def launches(self, step: CudaStep, y: torch.Tensor, x: torch.Tensor,
                 table: LoraWeightTable) -> tuple[list[Launch], list]:
        """The shrink and expand launches of one call, and every tensor they address (hold it until
        the launches are enqueued). Device-agnostic, so tests run it on CPU tensors too."""
        if x.shape[1] != table.h_in or y.shape[1] != table.h_out or x.shape[0] != step.num_tokens:
            raise ValueError(f"LoRA call: x {tuple(x.shape)}, y {tuple(y.shape)} do not match "
                             f"[{step.num_tokens}, h_in={table.h_in}] / [.., h_out={table.h_out}]")
        if not step.segments.slots or x.shape[0] == 0:
            return [], []
        ptrs = self.table_pointers(table, y.device, y.dtype)
        if ptrs.host.max_rank == 0:
            return [], []
        ldv = ptrs.host.max_rank
        needed = step.num_tokens * ldv
        if step.v is None or step.v.numel() < needed:
            step.v = torch.empty(needed, dtype=torch.float32, device=y.device)
        v = step.v[:needed]
        v.zero_()  # the shrink adds its split-k partial sums into v
        values = dict(x=x.data_ptr(), ldx=x.stride(0), y=y.data_ptr(), ldy=y.stride(0), v=v.data_ptr(), ldv=ldv,
                      a_ptrs=ptrs.a_ptrs.data_ptr(), b_ptrs=ptrs.b_ptrs.data_ptr(), ranks=ptrs.ranks.data_ptr())
        key = PlanKey(DTYPE_NAMES[y.dtype], table.h_in, table.h_out)
        templates = step.plans.get(key)
        if templates is None:
            templates = step.plans[key] = self._plan(step, key, values)
        used = [v, step.token_slots, step.seg_arrays, ptrs.a_ptrs, ptrs.b_ptrs, ptrs.ranks, *ptrs.host.keep]
        return for_call(templates, **values), used

    def _plan(self, step: CudaStep, key: PlanKey, values: dict[str, int]) -> list[Launch]:
        segs = step.segments
        problem = LoraProblem(
            dtype=key.dtype, num_tokens=step.num_tokens, h_in=key.h_in, h_out=key.h_out,
            token_slots=step.token_slots.data_ptr(), seg_starts=step.seg_arrays[0].data_ptr(),
            seg_ends=step.seg_arrays[1].data_ptr(), seg_slots=step.seg_arrays[2].data_ptr(),
            num_segments=len(segs.slots), max_segment_len=segs.max_len, **values)
        return plan(problem, step.variant, self.sm_count)
