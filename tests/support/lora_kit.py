"""Helpers shared by the LoRA backend tests (tests/lora, tests/cuda)."""
from __future__ import annotations

import torch

from multilora.lora.backends import LoraBackend, select_backend
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraTarget, LoraTargets, LoraWeightTable


def whole_table(table: LoraWeightTable) -> LoraTargets:
    """One table covering all of y's columns: the op on a plain [T, h_out] output."""
    return LoraTargets([LoraTarget("all", 0, table.h_out, table)])


def apply_lora(y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, batch: LoraBatch,
               backend: LoraBackend | None = None) -> LoraBackend:
    """One projection's call as an engine on the CPU in float32 makes it: the backend select_backend
    picks there (or `backend`) plans the step, then applies it. Returns the backend."""
    backend = backend or select_backend(torch.device("cpu"), torch.float32, None)
    backend.apply(y, x, targets, backend.plan_step(batch))
    return backend
