"""LoRA as a layer: each targeted base projection wrapped with the adapters' slot stacks.

The model is built and loaded as a plain model; `add_lora_layers` then wraps its projections. A
wrapped projection computes its base output and adds, for each output slice PEFT can target (q, k
and v of a fused qkv; or the whole fused projection for Phi-3), the delta of each token's adapter.
Which adapter each token uses is the step's LoraBatch, which the model runner builds once and
hands to the model's LoraContext; the context has the engine's one backend (lora/backends) plan the
step once, and the layers only read that plan. So the model file knows nothing of LoRA, and a new
model family declares its targets (models/families.py) without any LoRA code.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from ..models.decoder import DecoderModel
from ..models.families import output_sizes
from .backends import LoraBackend
from .plan import LoraBatch
from .weights import LoraTarget, LoraTargets, LoraWeightTable


class AdapterWeights(Protocol):
    """What the layers read of an adapter (adapters.files.LoraAdapter): A^T [h_in, r] and
    scale * B^T [r, h_out] by (decoder layer, target name)."""

    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


class LoraContext:
    """The engine's LoRA backend and the current step's plan, shared by all LoRA layers of one model."""

    def __init__(self, backend: LoraBackend) -> None:
        self.backend = backend
        self.batch: LoraBatch | None = None
        self.plan: Any = None  # what the backend planned for `batch`

    @contextmanager
    def step(self, batch: LoraBatch | None, plan: Any = None) -> Iterator[None]:
        """The layers apply `batch` (None: no token has an adapter) until the step ends; the backend
        plans it here, once, in the thread that runs the forward pass, unless the caller has the
        `plan` already (a CUDA graph's capture: backends.cuda.CudaBackend.plan_graph)."""
        self.batch = batch
        if plan is None and batch is not None:
            plan = self.backend.plan_step(batch)
        self.plan = plan
        try:
            yield
        finally:
            self.batch = self.plan = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, targets: LoraTargets, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.targets = targets
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, out]
        context = self.context
        if context.batch is not None:
            context.backend.apply(y, x, self.targets, context.plan)  # all targets in one call: they share x
        return y


class LoraLayers:
    """Every LoRA layer of a model, by decoder layer and target name: where adapters are installed."""

    def __init__(self, context: LoraContext, tables: list[dict[str, LoraWeightTable]]) -> None:
        self.context = context
        self.tables = tables  # [layer][target name]
        self.version = 0  # bumped by every install: what replays of captured CUDA graphs check

    def install(self, slot: int, adapter: AdapterWeights | None) -> None:
        """Point `slot` of every table at the adapter's weights (on the model's device), or empty it."""
        self.version += 1
        for layer, tables in enumerate(self.tables):
            for target, table in tables.items():
                pair = adapter.weights.get((layer, target)) if adapter is not None else None
                table.set_slot(slot, *(pair if pair is not None else (None, None)))


def add_lora_layers(model: DecoderModel, num_slots: int, backend: LoraBackend) -> LoraLayers:
    """Wrap each base projection of each decoder layer in a LoraLinear with `num_slots` slots,
    computed by `backend` (the engine's one choice: lora.backends.select_backend)."""
    context = LoraContext(backend)
    tables: list[dict[str, LoraWeightTable]] = []
    for layer in model.layers:
        by_target: dict[str, LoraWeightTable] = {}
        for projection in model.family.projections:
            base = getattr(layer, projection.name)
            targets, start = [], 0
            for name, size in zip(projection.lora_targets, output_sizes(model.config, projection)):
                table = LoraWeightTable(base.in_features, size, num_slots)
                targets.append(LoraTarget(name, start, start + size, table))
                by_target[name] = table
                start += size
            setattr(layer, projection.name, LoraLinear(base, LoraTargets(targets), context))
        tables.append(by_target)
    return LoraLayers(context, tables)
