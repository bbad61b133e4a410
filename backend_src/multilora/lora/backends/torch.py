"""The PyTorch backend: one matmul pair per segment, on views.

The reference the other backends are tested against, what they hand a call they cannot take, and
the engine's backend where neither fits (CUDA with our kernels off, CPU without the fused op or in
another dtype than float32). It plans nothing beyond the step's segments.
"""
from __future__ import annotations

import torch

from ..plan import LoraBatch, Segment
from ..weights import LoraTargets, LoraWeightTable


class TorchBackend:
    name = "torch"

    def plan_step(self, batch: LoraBatch) -> LoraBatch:
        """The segments are the whole plan."""
        return batch

    def apply(self, y: torch.Tensor, x: torch.Tensor, targets: LoraTargets, plan: LoraBatch) -> None:
        """y[t, target columns] += x[t] @ a[slot[t]] @ b[slot[t]] for every target, in place."""
        for target in targets.targets:
            apply_segments(y[:, target.start:target.end], x, target.table, plan.segments)


def apply_segments(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable, segments: list[Segment]) -> None:
    """One table: y[seg] += (x[seg] @ A) @ B, one matmul pair per segment, on views."""
    for seg in segments:
        a = table.a[seg.slot]
        if a is None:
            continue
        y[seg.start:seg.end].addmm_(x[seg.start:seg.end] @ a, table.b[seg.slot])
