"""The CUDA backend: our kernels, one launch pair (shrink, expand) per projection for all of its
targets and all adapters of a step.

Planned once per step (CudaStep, from the step's LoraBatch): the segment arrays and token slots are
uploaded once and the driver context is made current once. Each projection shape's grid is planned
and its arguments packed (cuda/launches.PackedLaunch) once for a step layout (tokens, variant,
segments) and kept across steps (PackedCall, the last CACHED_CALLS layouts): a step's first call of
a shape only writes the step's array addresses into them, and every call its x, y and descriptor
addresses, then launches. The descriptor
(lora_launch.descriptor) holds a projection's targets: each slot's weights, where the adapter slots
put them, and ranks, per target. The backend keeps one per projection in a device buffer whose
address never changes, rewritten in place only after `set_slot` changed one of its tables (their
versions): a captured CUDA graph reads the current adapters through it (`refresh`).

A call the kernels cannot take (a dtype without kernels, strided columns: `supported_layout`), and
every call when the backend has no kernels (plans only, as the tests run it), goes to the PyTorch
reference instead, target by target.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from ...cuda.driver import DTYPE_NAMES, step_stream
from ...cuda.launches import PackedLaunch
from ...cuda.lora_launch import SIGNATURES, LoraProblem, choose_variant, descriptor, family_of, plan, v_floats
from ..plan import LoraBatch
from ..weights import LoraTargets, LoraWeightTable, slot_pointers
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
    h_outs: tuple[int, ...]
    ldv: int
    num_slots: int
    ldx: int
    ldy: int


class CallKey(NamedTuple):
    """What a shape's packed launches depend on besides the step's arrays: the step's layout."""

    shape: PlanKey
    variant: str
    num_tokens: int
    num_segments: int
    max_segment_len: int


CACHED_CALLS = 64  # packed calls kept across steps (a few shapes x the recent step layouts)
STEP_ARGS = ("token_slots", "seg_starts", "seg_ends", "seg_slots", "v")  # written once per step


@dataclass
class ProjectionDesc:
    """One projection's targets on the device, as the kernels read them (lora_launch.descriptor)."""

    tables: tuple[LoraWeightTable, ...]
    versions: tuple[int, ...]  # the tables' versions the contents were built from
    tensor: torch.Tensor  # int64 on the device; rewritten in place, so its address never changes
    dtype: torch.dtype  # the weights' (and activations') dtype
    max_rank: int  # the largest rank of the targets' slots (0: no adapter targets this projection)
    rank_room: int  # v columns per target: target j's rank columns start at j * rank_room
    keep: list[torch.Tensor]  # what the addresses point to
    shape: tuple = ()  # PlanKey's fields but the strides: (dtype, h_in, h_outs, ldv, num_slots)

    def __post_init__(self) -> None:
        self.shape = (DTYPE_NAMES.get(self.dtype), self.tables[0].h_in, tuple(t.h_out for t in self.tables),
                      len(self.tables) * self.rank_room, self.tables[0].num_slots)


class PackedCall:
    """A projection shape's shrink and expand, packed once per step layout; `bind` points them at a
    step's arrays and scratch, `aim` at one call. The launches hold the call, and it what they
    address: the step's arrays and scratch, and the descriptor of the call they are aimed at."""

    __slots__ = ("shrink", "expand", "v_floats", "desc", "arrays")

    def __init__(self, shrink: PackedLaunch, expand: PackedLaunch, v_floats: int) -> None:
        self.shrink, self.expand, self.v_floats = shrink, expand, v_floats
        self.desc: ProjectionDesc | None = None
        self.arrays: tuple[torch.Tensor, ...] = ()
        shrink.keep = expand.keep = self

    def bind(self, step: CudaStep) -> None:
        """Aim at `step`'s token slots, segment arrays and scratch (which holds v_floats floats)."""
        seg = step.seg_arrays
        addresses = dict(token_slots=step.token_slots.data_ptr(), seg_starts=seg[0].data_ptr(),
                         seg_ends=seg[1].data_ptr(), seg_slots=seg[2].data_ptr(), v=step.v.data_ptr())
        for launch in (self.shrink, self.expand):
            for name in STEP_ARGS:
                if name in launch.names:
                    launch.set(name, addresses[name])
        self.arrays = (step.v, step.token_slots, step.seg_arrays)

    def aim(self, x: int, y: int, desc: ProjectionDesc) -> tuple[PackedLaunch, PackedLaunch]:
        address = desc.tensor.data_ptr()
        self.shrink.set("x", x)
        self.shrink.set("desc", address)
        self.expand.set("y", y)
        self.expand.set("desc", address)
        self.desc = desc
        return self.shrink, self.expand


@dataclass
class CudaStep:
    """The kernels' view of one step: its arrays on the device, stream, scratch and launch plans."""

    batch: LoraBatch  # the segments, for the calls the kernels do not take
    segments: StepSegments
    variant: str
    token_slots: torch.Tensor  # [T] int32 on the device
    seg_arrays: torch.Tensor  # [3, S] int32: starts, ends, slots
    stream: int = 0
    graph: bool = False  # planned for a CUDA graph's capture: every call launches (see plan_graph)
    v: torch.Tensor | None = None  # fp32 scratch: the shrink's partial sums; the largest any plan needs
    plans: dict[tuple, PackedCall] = field(default_factory=dict, repr=False)  # by (desc.shape, strides)
    scratch: list[torch.Tensor] = field(default_factory=list, repr=False)  # every v a plan addresses

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


class CudaBackend:
    name = "cuda"

    def __init__(self, kernels: CudaKernels | None, max_rank: int = 0, sm_count: int | None = None) -> None:
        """`kernels` None plans without launching (tests run the plans on a CPU emulation); then
        `sm_count` must be given. `max_rank` (the engine's max_lora_rank) fixes each target's room in
        the scratch, so every projection of a model shares one plan per shape; 0 takes each
        projection's largest rank."""
        self.kernels = kernels
        self.max_rank = max_rank
        self.sm_count = sm_count if sm_count is not None else kernels.sm_count
        self.projections: weakref.WeakKeyDictionary[LoraTargets, ProjectionDesc] = weakref.WeakKeyDictionary()
        self.calls: OrderedDict[CallKey, PackedCall] = OrderedDict()  # eager steps' packed calls, oldest first

    def plan_step(self, batch: LoraBatch) -> CudaStep:
        """Upload the step's arrays and make the context current, once per step, in the thread that
        runs the forward pass."""
        device = batch.token_slots.device
        segs = step_segments(batch)
        return CudaStep(
            batch=batch, segments=segs, variant=choose_variant(segs.adapter_tokens, len(segs.slots)),
            token_slots=batch.token_slots.to(dtype=torch.int32),
            seg_arrays=torch.tensor([segs.starts, segs.ends, segs.slots], dtype=torch.int32).to(device),
            stream=step_stream(self.kernels, device))

    def plan_graph(self, token_slots: torch.Tensor) -> CudaStep:
        """The plan of a decode step that a CUDA graph captures: the token variant (the slots are read
        from `token_slots`, the graph's static int32 buffer, at each replay), nothing uploaded, the
        launches on the current (capturing) stream. Needs `max_rank`: the scratch layout the graph
        holds must fit every adapter loaded later."""
        if not self.max_rank:
            raise ValueError("a CUDA graph's LoRA plan needs the backend's max_rank (the engine's max_lora_rank)")
        batch = LoraBatch(segments=[], token_slots=token_slots, num_tokens=token_slots.numel())
        return CudaStep(batch=batch, segments=step_segments(batch), variant="token", token_slots=token_slots,
                        seg_arrays=token_slots.new_zeros(3, 0), stream=step_stream(self.kernels, token_slots.device),
                        graph=True)

    def apply(self, y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, plan: CudaStep) -> None:
        """y[t, target columns] += x[t] @ A_slot @ B_slot for every target, in place, on the step's stream."""
        if self.kernels is None or not supported_layout(y, x):
            for target in targets.targets:
                apply_segments(y[:, target.start:target.end], x, target.table, plan.batch.segments)
            return
        for launch in self.launches(plan, y, x, targets):
            self.kernels.launch(launch, plan.stream)

    def launches(self, step: CudaStep, y: torch.Tensor, x: torch.Tensor,
                 targets: LoraTargets) -> tuple[PackedLaunch, ...]:
        """The shrink and expand of one projection's call, packed and aimed at its x and y (valid until
        the next call of the same shape and step layout). Device-agnostic, so tests run them on CPU
        tensors too."""
        last = targets.targets[-1]
        if x.shape[0] != step.num_tokens or x.shape[1] != last.table.h_in or y.shape[1] < last.end:
            raise ValueError(f"LoRA call: x {tuple(x.shape)}, y {tuple(y.shape)} do not match [{step.num_tokens}, "
                             f"h_in={last.table.h_in}] / targets up to column {last.end}")
        if not step.graph and not step.segments.slots or x.shape[0] == 0:
            return ()
        desc = self.descriptor(targets, y.device, y.dtype)
        if desc.max_rank == 0 and not step.graph:  # no adapter has this projection (a graph may see one later)
            return ()
        strides = (x.stride(0), y.stride(0))
        call = step.plans.get((desc.shape, strides))
        if call is None:
            call = step.plans[desc.shape, strides] = self._call(step, PlanKey(*desc.shape, *strides), desc)
        return call.aim(x.data_ptr(), y.data_ptr(), desc)

    def _call(self, step: CudaStep, key: PlanKey, desc: ProjectionDesc) -> PackedCall:
        """The step's first call of a shape: the packed launches of its layout (kept across eager
        steps; a graph's capture packs its own), bound to the step's arrays and scratch."""
        layout = CallKey(key, step.variant, step.num_tokens, len(step.segments.slots), step.segments.max_len)
        call = None if step.graph else self.calls.get(layout)
        if call is None:
            call = self._plan(step, key, desc)
            if not step.graph:
                self.calls[layout] = call
                if len(self.calls) > CACHED_CALLS:
                    self.calls.popitem(last=False)
        elif not step.graph:
            self.calls.move_to_end(layout)
        if step.v is None or step.v.numel() < call.v_floats:
            # Earlier calls keep addressing the smaller one: the step holds every v to its end.
            step.v = torch.empty(call.v_floats, dtype=torch.float32, device=desc.tensor.device)
            step.scratch.append(step.v)
        call.bind(step)
        return call

    def descriptor(self, targets: LoraTargets, device: torch.device, dtype: torch.dtype) -> ProjectionDesc:
        """The projection's descriptor on the device, rewritten (in place) only after its tables changed."""
        desc = self.projections.get(targets)
        if desc is None or desc.versions != targets.versions:
            desc = self._build_descriptor(targets, device, dtype, desc)
        return desc

    def refresh(self) -> None:
        """Bring every descriptor up to date with its tables, before a captured graph that reads them
        replays (the layers' calls, which do this per call, are not run then)."""
        for targets, desc in list(self.projections.items()):
            if desc.versions != targets.versions:
                self._build_descriptor(targets, desc.tensor.device, desc.dtype, desc)

    def _build_descriptor(self, targets: LoraTargets, device: torch.device, dtype: torch.dtype,
                          old: ProjectionDesc | None) -> ProjectionDesc:
        tables = tuple(t.table for t in targets.targets)
        versions = targets.versions
        ptrs = [slot_pointers(table, device, dtype) for table in tables]
        largest = max(p.max_rank for p in ptrs)
        if self.max_rank and largest > self.max_rank:
            raise ValueError(f"LoRA rank {largest} is over the backend's max_rank {self.max_rank}")
        room = old.rank_room if old is not None else (self.max_rank or largest)
        if largest > room:  # only without max_rank: the projection's plans change with its layout
            room, old = largest, None
        host = descriptor([p.a_ptrs for p in ptrs], [p.b_ptrs for p in ptrs], [p.ranks for p in ptrs],
                          [(t.start, t.end - t.start, j * room) for j, t in enumerate(targets.targets)])
        if old is not None:
            old.tensor.copy_(torch.tensor(host, dtype=torch.int64))
            tensor = old.tensor
        else:
            tensor = torch.tensor(host, dtype=torch.int64, device=device)
        desc = ProjectionDesc(tables, versions, tensor, dtype, largest, room, [w for p in ptrs for w in p.keep])
        self.projections[targets] = desc
        return desc

    def _plan(self, step: CudaStep, key: PlanKey, desc: ProjectionDesc) -> PackedCall:
        """Grid and packed arguments of a shape and step layout; every address is written later."""
        problem = LoraProblem(
            dtype=key.dtype, num_tokens=step.num_tokens, h_in=key.h_in, h_outs=key.h_outs, num_slots=key.num_slots,
            x=0, ldx=key.ldx, y=0, ldy=key.ldy, v=0, ldv=key.ldv, desc=0, num_segments=len(step.segments.slots),
            max_segment_len=step.segments.max_len)
        shrink, expand = (PackedLaunch(launch, SIGNATURES[family_of(launch.kernel)])
                          for launch in plan(problem, step.variant, self.sm_count))
        return PackedCall(shrink, expand, v_floats(problem, step.variant, self.sm_count))
