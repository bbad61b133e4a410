"""The CUDA path of decode attention: our paged kernel reads each decode row's KV blocks in place.

The PyTorch path (models/attention._decode) copies every row's padded context out of the cache,
per layer, before SDPA reads it again. The kernel (paged_decode in data/lora_kernels.cu)
instead follows each row's block table and reads the keys and values where they are, once.

The model runner builds one PagedDecode per step when the kernels are loaded (the same module as
the LoRA kernels, so the `cuda_kernels` parameter decides for both). Each layer shape and window
is planned at its first layer: context splits, grid, the fp32 scratch for the splits, and its
arguments packed once (launches.PackedLaunch); a later layer only writes its own q, caches and
output into them. For a CUDA graph the step is built on the graph's static block tables and context
lengths with `max_context` the longest a row may have, so the captured plan fits every replay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from .attention_launch import (
    LAYER_ARGS,
    MAX_HEAD_DIM,
    SIGNATURES,
    DecodeShape,
    family_of,
    plan_decode,
    scratch_floats,
    split_context,
)
from .driver import DTYPE_NAMES, step_stream
from .launches import PackedLaunch

if TYPE_CHECKING:
    from .module import CudaKernels


class LayerKey(NamedTuple):
    """What a layer's plan depends on: layers that share it share their plan (and its scratch)."""

    shape: DecodeShape
    q_row_stride: int
    out_row_stride: int


@dataclass
class PagedDecode:
    """The kernel's view of one step's decode rows; `run` is the per-layer call."""

    block_tables: torch.Tensor  # [Bd, max blocks] int64 on the device: each row's cache blocks
    ctx_lens: torch.Tensor  # [Bd] int64 on the device: tokens in each row's context, the new one included
    max_context: int
    block_size: int
    sm_count: int
    kernels: CudaKernels | None = None  # None: plan only (tests run the plans on a CPU emulation)
    stream: int = 0
    # The packed launches and the scratch they address, per layer shape and strides.
    _plans: dict[LayerKey, tuple[list[PackedLaunch], torch.Tensor | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, kernels: CudaKernels | None, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
              max_context: int, block_size: int, sm_count: int | None = None) -> PagedDecode:
        stream = step_stream(kernels, ctx_lens.device)
        return cls(block_tables, ctx_lens, max_context, block_size,
                   sm_count if sm_count is not None else kernels.sm_count, kernels, stream)

    def supports(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether the kernel takes this layer: dtypes, layouts and head_dim it handles."""
        d = q.shape[-1]
        return (q.dtype in DTYPE_NAMES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
                and q.device == k_cache.device == v_cache.device == self.ctx_lens.device
                and q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == d and d <= MAX_HEAD_DIM
                and k_cache.shape == v_cache.shape and k_cache.dim() == 3 and k_cache.shape[2] == d
                and q.shape[1] % k_cache.shape[1] == 0 and k_cache.is_contiguous() and v_cache.is_contiguous())

    def launches(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 scale: float, window: int | None) -> list[PackedLaunch]:
        """The launches of one layer (q, out: [Bd, H, d]), aimed at it (valid until the next layer of
        the same shape). Device-agnostic, so tests run them on CPU tensors too."""
        shape = DecodeShape(dtype=DTYPE_NAMES[q.dtype], num_rows=q.shape[0], num_heads=q.shape[1],
                            kv_heads=k_cache.shape[1], head_dim=q.shape[2], block_size=self.block_size,
                            window=window or 0, scale=scale, max_context=self.max_context)
        layer = dict(q=q.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), out=out.data_ptr())
        key = LayerKey(shape, q.stride(0), out.stride(0))
        planned = self._plans.get(key)
        if planned is None:
            planned = self._plans[key] = self._plan(shape, q, out, layer)
        launches = planned[0]
        for launch in launches:
            for name in LAYER_ARGS:
                if name in launch.names:
                    launch.set(name, layer[name])
        return launches

    def _plan(self, shape: DecodeShape, q: torch.Tensor, out: torch.Tensor,
              layer: dict[str, int]) -> tuple[list[PackedLaunch], torch.Tensor | None]:
        splits, split_len = split_context(shape, self.sm_count)
        outputs, pairs = scratch_floats(shape, splits)
        scratch = torch.empty(outputs + pairs, dtype=torch.float32, device=q.device) if outputs else None
        part_out = scratch.data_ptr() if scratch is not None else 0
        part_ml = part_out + 4 * outputs if scratch is not None else 0
        launches = plan_decode(shape, splits, split_len, ldq=q.stride(0), ldo=out.stride(0),
                               block_tables=self.block_tables.data_ptr(), ld_table=self.block_tables.stride(0),
                               ctx_lens=self.ctx_lens.data_ptr(), part_out=part_out, part_ml=part_ml, **layer)
        packed = [PackedLaunch(launch, SIGNATURES[family_of(launch.kernel)]) for launch in launches]
        for launch in packed:
            launch.keep = (scratch, self.block_tables, self.ctx_lens)
        return packed, scratch

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
            scale: float, window: int | None) -> None:
        """out[r, h] = attention of q[r, h] over row r's cached context, on the step's stream."""
        for launch in self.launches(q, k_cache, v_cache, out, scale, window):
            self.kernels.launch(launch, self.stream)  # the scratch lives with the step's plans
