"""Base-model projections on CPU with weights pre-packed for oneDNN.

A decode step multiplies a few dozen rows by every weight matrix; with the weight reordered once
into oneDNN's blocked layout those matmuls run about 1.3x faster on this project's CPU than
`F.linear` on the plain layout, and prefill-sized ones about as fast (docs/design.md). The
packed tensor replaces the plain one, so the model is still held once.
"""
from __future__ import annotations

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
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:rows]


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(module: nn.Module, names: list[str], reorder: bool = True) -> None:
    """Swap the named `nn.Linear` children of `module` for packed ones (`reorder`: see PackedLinear)."""
    for name in names:
        setattr(module, name, PackedLinear(getattr(module, name), reorder))
