"""The LoRA backends, and the one choice of backend an engine makes at start.

Like vLLM's punica selector, the engine picks one backend for its device and dtype when it adds
the LoRA layers; every step and every layer then use it. Each backend plans its own per-step work
from the step's LoraBatch once (`plan_step`) and applies every projection's targets in one call
(`apply`), keeping whatever it derives from the weight tables in its own caches, keyed by the
tables' versions. A call a backend cannot take goes to the PyTorch reference inside that backend.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from .. import native
from .cpu import CpuBackend
from .cuda import CudaBackend
from .torch import TorchBackend

if TYPE_CHECKING:  # the name `torch` in this package is its backend module (.torch)
    import torch

    from ...cuda.module import CudaKernels
    from ..plan import LoraBatch
    from ..weights import LoraTargets

log = logging.getLogger(__name__)


class LoraBackend(Protocol):
    """How one engine computes the LoRA deltas of a step."""

    name: str

    def plan_step(self, batch: LoraBatch) -> Any:
        """The backend's plan of one step, built once, before the forward pass, by the thread that runs it."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, plan: Any) -> None:
        """y[t, target columns] += x[t] @ A[slot[t]] @ B[slot[t]] for every target of one projection and
        every token with an adapter, in place. x: [T, h_in]; y: [T, out], the projection's output."""


def select_backend(device: torch.device, dtype: torch.dtype, kernels: CudaKernels | None,
                   max_rank: int = 0) -> LoraBackend:
    """The engine's backend, said once in the log: our kernels when they are loaded (`kernels`: on
    CUDA, unless they are switched off or failed to load); on the CPU in float32 the fused native op
    when it is built (on the ISA level lora.native.choose_isa picks); else the PyTorch reference
    (CUDA without our kernels; the CPU without the op or
    in another dtype). `max_rank` sizes the CUDA backend's per-step scratch up front."""
    if kernels is not None:
        log.info("LoRA backend: cuda (our kernels, %s)", kernels.ptx_source)
        return CudaBackend(kernels, max_rank)
    if CpuBackend.takes(device, dtype) and (op := native.load()) is not None:
        backend = CpuBackend(op)
        log.info("LoRA backend: cpu (the fused native op, ISA level %s: %s, on %s)", backend.isa,
                 native.ISA_LEVELS[backend.isa], native.cpu_model())
        return backend
    log.info("LoRA backend: torch (the PyTorch path) on %s in %s", device, dtype)
    return TorchBackend()
