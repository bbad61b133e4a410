"""The CUDA path of apply_lora: two kernel launches (shrink, expand) for all adapters of a step.

The table's per-slot weights stay where the adapter store put them; the kernels find them
through a device array of addresses and a rank per slot (built once per table version, cached
in `table.device_cache`, dropped by `set_slot`). A step's segment arrays are built once per
step and cached in `batch.device_cache`, shared by every layer.
Set MULTILORA_LORA_KERNELS=0 to send CUDA tensors through the generic matmul path instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from multilora.kernels.launch import Launch, LoraProblem, choose_variant, plan

if TYPE_CHECKING:  # ops imports this module lazily; no import cycle at run time
    from multilora.lora.ops import LoraBatch, LoraWeightTable

DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
KERNELS_ENV = "MULTILORA_LORA_KERNELS"


@dataclass
class SlotPointers:
    """Per-slot addresses and ranks of one table, as host lists; `keep` holds what they point to."""

    a_ptrs: list[int]
    b_ptrs: list[int]
    ranks: list[int]
    max_rank: int
    keep: list[torch.Tensor]


@dataclass
class StepSegments:
    """A step's segments as lists, plus what the launch planning needs to know about them."""

    starts: list[int]
    ends: list[int]
    slots: list[int]
    max_len: int
    adapter_tokens: int


def kernels_support(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernels can take this call; otherwise apply_lora uses its matmul path."""
    if os.environ.get(KERNELS_ENV, "1") == "0":
        return False
    return (y.dtype in DTYPE_NAMES and x.dtype == y.dtype and x.device == y.device
            and x.dim() == 2 and y.dim() == 2 and x.shape[0] == y.shape[0]
            and (x.stride(1) == 1 or x.shape[1] == 1) and (y.stride(1) == 1 or y.shape[1] == 1))


def slot_pointers(table: LoraWeightTable, device: torch.device, dtype: torch.dtype) -> SlotPointers:
    """Addresses of each slot's A^T [h_in, r] and B^T [r, h_out]; 0 and rank 0 for empty slots.

    Weights that are not contiguous are copied once (and kept alive here) because the kernels
    read them as dense row-major blocks.
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


def step_segments(batch: LoraBatch) -> StepSegments:
    """Segment bounds and slots as lists, the longest segment, and tokens that have an adapter."""
    segs = batch.segments
    return StepSegments(
        starts=[s.start for s in segs], ends=[s.end for s in segs], slots=[s.slot for s in segs],
        max_len=max((s.end - s.start for s in segs), default=0),
        adapter_tokens=sum(s.end - s.start for s in segs))


def _device_tables(table: LoraWeightTable, device: torch.device, dtype: torch.dtype) -> dict:
    cached = table.device_cache.get("cuda")
    if cached is not None and cached["device"] == device and cached["dtype"] == dtype:
        return cached
    ptrs = slot_pointers(table, device, dtype)
    cached = {
        "device": device, "dtype": dtype, "max_rank": ptrs.max_rank, "keep": ptrs.keep,
        "a_ptrs": torch.tensor(ptrs.a_ptrs, dtype=torch.int64, device=device),
        "b_ptrs": torch.tensor(ptrs.b_ptrs, dtype=torch.int64, device=device),
        "ranks": torch.tensor(ptrs.ranks, dtype=torch.int32, device=device),
    }
    table.device_cache["cuda"] = cached
    return cached


def _device_step(batch: LoraBatch, device: torch.device) -> dict:
    cached = batch.device_cache.get("cuda")
    if cached is not None and cached["device"] == device:
        return cached
    segs = step_segments(batch)
    token_slots = batch.token_slots.to(device=device, dtype=torch.int32)
    cached = {
        "device": device, "segments": segs, "token_slots": token_slots,
        # [3, S]: starts, ends, slots; one host-to-device copy per step
        "seg_arrays": torch.tensor([segs.starts, segs.ends, segs.slots], dtype=torch.int32,
                                   device=device),
    }
    batch.device_cache["cuda"] = cached
    return cached


def prepare_launches(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable, batch: LoraBatch,
                     sm_count: int) -> tuple[list[Launch], list[torch.Tensor]]:
    """The shrink and expand launches for one call, and every tensor they address (hold it until
    the launches are enqueued). Device-agnostic, so tests run it on CPU tensors too."""
    if x.shape[1] != table.h_in or y.shape[1] != table.h_out or x.shape[0] != batch.num_tokens:
        raise ValueError(f"apply_lora: x {tuple(x.shape)}, y {tuple(y.shape)} do not match "
                         f"[{batch.num_tokens}, h_in={table.h_in}] / [.., h_out={table.h_out}]")
    if not batch.segments or x.shape[0] == 0:
        return [], []
    device = y.device
    tables = _device_tables(table, device, y.dtype)
    if tables["max_rank"] == 0:
        return [], []
    step = _device_step(batch, device)
    segs: StepSegments = step["segments"]
    v = torch.zeros(x.shape[0], tables["max_rank"], dtype=torch.float32, device=device)  # [T, r_max]
    seg_arrays = step["seg_arrays"]
    problem = LoraProblem(
        dtype=DTYPE_NAMES[y.dtype], num_tokens=x.shape[0], h_in=table.h_in, h_out=table.h_out,
        x=x.data_ptr(), ldx=x.stride(0), y=y.data_ptr(), ldy=y.stride(0), v=v.data_ptr(),
        ldv=tables["max_rank"], a_ptrs=tables["a_ptrs"].data_ptr(),
        b_ptrs=tables["b_ptrs"].data_ptr(), ranks=tables["ranks"].data_ptr(),
        token_slots=step["token_slots"].data_ptr(), seg_starts=seg_arrays[0].data_ptr(),
        seg_ends=seg_arrays[1].data_ptr(), seg_slots=seg_arrays[2].data_ptr(),
        num_segments=len(segs.slots), max_segment_len=segs.max_len)
    variant = choose_variant(segs.adapter_tokens, len(segs.slots))
    used = [v, step["token_slots"], seg_arrays, tables["a_ptrs"], tables["b_ptrs"], tables["ranks"],
            *tables["keep"]]
    return plan(problem, variant, sm_count), used


def apply_lora_cuda(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable,
                    batch: LoraBatch) -> None:
    """y[t] += x[t] @ A_slot @ B_slot on the GPU, in place, on PyTorch's current stream."""
    from multilora.kernels.loader import kernels_for

    device = y.device
    kernels = kernels_for(device.index if device.index is not None else torch.cuda.current_device())
    launches, used = prepare_launches(y, x, table, batch, kernels.sm_count)
    stream = torch.cuda.current_stream(device).cuda_stream
    for launch in launches:
        kernels.launch(launch, stream)
    # `used` (v above all) is released after this returns: the caching allocator hands that memory
    # only to later work on this same stream, which runs after these kernels.
    del used
