"""Base-model projections on CPU with weights pre-packed for oneDNN.

A decode step multiplies a few dozen rows by every weight matrix; with the weight reordered once
into oneDNN's blocked layout those matmuls run about 1.3x faster on this project's CPU than
`F.linear` on the plain layout, and prefill-sized ones about as fast (docs/design.md). The
packed tensor replaces the plain one, so the model is still held once.

One user's decode step multiplies a single row (or a few) by every weight: there oneDNN reads the
packed weight well below the machine's bandwidth. When the packed layout is one the native
few-row kernel reads (`packed_blocks`, checked value by value at load), the engine hands that
kernel to the layer (`use_few_rows`) and steps of up to FEW_ROWS rows go through it, on the same
packed bytes.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def padded_rows(rows: int) -> int:
    """The row count a packed matmul runs with: `rows` rounded up to a few sizes.

    oneDNN builds (JIT-compiles) and keeps a primitive, with its buffers, for every distinct row
    count it sees; a server sees every count from 1 to `max_num_batched_tokens`, and the process
    grew by hundreds of MB (2.2 GB for 1,536 shapes on three small matrices; bench/adapter_scale.py
    went from 1.1x to 2x the adapters' bytes). Rounded up to 16 rows up to 64, 128 up to 1024 and
    512 above, a server sees a dozen sizes up to 1024 rows, and the padding costs at most 15 rows
    of a decode batch (make bench's base-only throughput: 277-307 tokens/s after, 254-288 before).
    Below 16 rows the sizes are powers of two: one user's decode step (1 row) reads each weight
    once for one row instead of computing 16 (a 30-layer model's projections, one thread: 40
    instead of 56 ms a token).
    """
    if 0 < rows < 16:
        return 1 << (rows - 1).bit_length()
    step = 16 if rows <= 64 else 128 if rows <= 1024 else 512
    return -(-rows // step) * step


FEW_ROWS = 8  # steps of up to this many rows take the few-row kernel (where the layer has it)
BLOCK_WIDTHS = (64, 32, 16, 48, 8, 24, 128, 96)  # outputs per block of the layouts packed_blocks tries


def packed_floats(packed: torch.Tensor) -> torch.Tensor | None:
    """The raw floats of a oneDNN (mkldnn) tensor, as a view; None where torch cannot say where they are."""
    if not (hasattr(torch.ops.mkldnn, "data_ptr") and hasattr(torch.ops.mkldnn, "_nbytes")):
        return None
    count = torch.ops.mkldnn._nbytes(packed) // 4
    buffer = (ctypes.c_float * count).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(buffer, dtype=torch.float32, count=count)


def packed_blocks(plain: torch.Tensor, packed: torch.Tensor) -> tuple[int, int] | None:
    """(ob, ip) when `packed`, oneDNN's reorder of the fp32 [out, in] weight `plain`, holds it as
    [ceil(out / ob)][ip][ob] (the ob outputs of a block side by side for each input, ip >= in):
    the layout the few-row kernel reads. oneDNN picks the layout by shape and CPU, so it is checked
    against `plain` element by element; None (the matmul stays with oneDNN) for any other."""
    raw = packed_floats(packed)
    if raw is None:
        return None
    out, inputs = plain.shape
    for ob in BLOCK_WIDTHS:
        blocks, full = -(-out // ob), out // ob
        if raw.numel() % (blocks * ob) or (ip := raw.numel() // (blocks * ob)) < inputs:
            continue
        cube = raw.view(blocks, ip, ob)
        if not torch.equal(cube[:1, :inputs, :min(ob, out)], plain[:min(ob, out)].T[None]):
            continue  # the first block says no: cheap
        if full and not torch.equal(cube[:full, :inputs], plain[:full * ob].view(full, ob, inputs).transpose(1, 2)):
            continue
        rest = out - full * ob
        if rest and not torch.equal(cube[full, :inputs, :rest], plain[full * ob:].T):
            continue
        return ob, ip
    return None


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward through oneDNN (fp32, CPU), on a weight reordered for it; or, with
    `reorder=False`, on the weight as it is, still shared (a tied output head: the embedding). The
    plain layout costs no copy, and oneDNN's one-row matmul still reads it at about twice the speed
    of `F.linear`'s (SmolLM2's 49152 x 576 head, 2 threads: 5.6 vs 10.4 ms a token)."""

    def __init__(self, linear: nn.Linear, reorder: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if reorder else linear.weight
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        # The packed layout, when the few-row kernel reads it; the kernel itself comes from use_few_rows.
        self.blocks = packed_blocks(weight, self.weight) if reorder else None
        self.address = torch.ops.mkldnn.data_ptr(self.weight) if self.blocks else 0
        self.few_rows: Callable[..., None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.few_rows is not None and rows <= FEW_ROWS and x.stride(-1) == 1:
            y = x.new_empty(rows, self.out_features)
            self.few_rows(y, x, self.address, self.out_features, *self.blocks, self.bias)
            return y
        padded = padded_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:rows]


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def use_few_rows(model: nn.Module, kernel: Callable[..., None]) -> int:
    """Give `kernel` (the native op's few_rows with its ISA level bound) to every packed layer whose
    layout it reads; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.blocks is not None]
    for layer in layers:
        layer.few_rows = kernel
    return len(layers)


def pack_linears(module: nn.Module, names: list[str], reorder: bool = True) -> None:
    """Swap the named `nn.Linear` children of `module` for packed ones (`reorder`: see PackedLinear)."""
    for name in names:
        setattr(module, name, PackedLinear(getattr(module, name), reorder))
