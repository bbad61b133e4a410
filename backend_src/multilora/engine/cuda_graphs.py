"""CUDA graphs for decode steps: the model's forward pass captured once per batch-size bucket, then
replayed with one copy of the step's inputs.

Why: an eager decode step launches every kernel of every layer from Python (PyTorch's own ops, our
LoRA and attention launches); for a small batch that host work takes as long as the GPU's. A
replay is one graph launch. As in nano-vllm and vLLM:

- Buckets: 1, 2, 4, 8, then every 8 up to max_num_seqs (`buckets`); a step's decode rows are
  padded to the smallest bucket that holds them. Padded rows read token 0 at position 0, have no
  adapter and an empty context, and write their key and value into one KV block held back for them
  (so no row's cache is touched).
- Static inputs: one int64 device buffer holds every graph's inputs (token ids, positions, cache
  entries, context lengths, adapter slots, block tables: `StaticInputs`); a replay fills its pinned
  host twin and copies the used part over in one transfer. The block tables keep the full
  `max_model_len` width, so the paged attention kernel is planned for the longest context and
  every replay fits the captured plan. The hidden states land in one static output.
- Our kernels are launched on the capturing stream (the LoRA step plan and the paged decode plan
  are made inside the capture, where torch's current stream is the capture stream); the LoRA
  kernels read the adapters through their projection descriptors, rewritten in place when slots
  change, so a graph captured before an adapter was loaded serves it.
- Captured at start, both with and without the LoRA launches (a step whose rows have no adapter
  replays the graph without them), largest bucket first into one shared memory pool: the graphs'
  intermediates take the largest bucket's activations once, plus per graph the small scratch our
  kernels keep (the LoRA partial sums, the attention splits). Capturing at start puts the cost
  (about two forward passes per graph) and any failure at model load rather than in a request.

Parameter `cuda_graphs` (auto / on / off): graphs need CUDA and our kernels (the PyTorch attention
path is not capturable: its gather is as wide as the longest context of each step). `auto` runs
decode eagerly, with one log line, when they cannot be used or the capture fails; `on` fails the
model load instead. Steps with prefill rows, and decode steps larger than max_num_seqs, run eagerly.
"""
from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..config import CUDA_GRAPH_MODES
from ..cuda.paged_decode import PagedDecode
from ..errors import ConfigError
from ..lora.layers import LoraLayers
from ..models.attention import AttentionMetadata
from .kv_cache import KVCache

log = logging.getLogger(__name__)

# The int64 inputs of a decode step, in the order of StaticInputs' regions (each max_rows long),
# and what a padded row holds ("trash": the held-back KV slot).
INPUTS = ("ids", "positions", "cache_index", "ctx_lens", "slots")
PADDING = {"ids": 0, "positions": 0, "cache_index": "trash", "ctx_lens": 0, "slots": -1}

Forward = Callable[[torch.Tensor, torch.Tensor, list, AttentionMetadata], torch.Tensor]


def buckets(max_rows: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every 8 up to `max_rows` (always one)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 8))
    return sizes + [max_rows]


def bucket_for(rows: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds `rows` rows; None when none does (the step runs eagerly)."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) and rows >= 1 else None


class GraphApi(Protocol):
    """What capture needs of torch.cuda (tests replace it: a CPU has no graphs)."""

    def capture(self, forward: Callable[[], Any], pool: Any) -> Any:
        """Warm `forward` up, then capture it; returns the graph (with replay())."""

    def pool(self) -> Any:
        """A memory pool the graphs share."""


class TorchGraphs:
    """torch.cuda.graph, with the warm-up torch asks for: one eager run on a side stream first
    (lazy initialisations, our descriptors' first upload)."""

    def capture(self, forward: Callable[[], Any], pool: Any) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward()
        return graph

    def pool(self) -> Any:
        return torch.cuda.graph_pool_handle()


class StaticInputs:
    """Every graph's inputs in one int64 device buffer (and its pinned host twin): INPUTS regions of
    `max_rows` each, then the block tables [max_rows, max_blocks]. A bucket's graph reads the first
    `bucket` entries of each region."""

    def __init__(self, max_rows: int, max_blocks: int, trash_slot: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks
        size = len(INPUTS) * max_rows + max_rows * max_blocks
        self.device = torch.zeros(size, dtype=torch.int64, device=device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._host = self.host.numpy()
        self._regions = self._host[:len(INPUTS) * max_rows].reshape(len(INPUTS), max_rows)
        self._tables = self._host[len(INPUTS) * max_rows:].reshape(max_rows, max_blocks)
        self._padding = np.array([[trash_slot if PADDING[n] == "trash" else PADDING[n]] for n in INPUTS])
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        views = self.device[:len(INPUTS) * max_rows].view(len(INPUTS), max_rows)
        self.views = dict(zip(INPUTS, views))
        self.tables = self.device[len(INPUTS) * max_rows:].view(max_rows, max_blocks)

    def pad(self, bucket: int) -> None:
        """Every row of the bucket padded (what the capture and its warm-up run on)."""
        self._regions[:, :bucket] = self._padding
        self._tables[:bucket] = 0
        self.device.copy_(self.host)

    def fill(self, bucket: int, inputs: dict[str, np.ndarray], tables: np.ndarray) -> None:
        """One step's rows, padded to `bucket`, copied to the device in one transfer. `tables`:
        [rows, width] of the rows' block tables (the columns past their contexts are never read)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
        rows, width = tables.shape
        regions = self._regions
        regions[:, rows:bucket] = self._padding
        for i, name in enumerate(INPUTS):
            regions[i, :rows] = inputs[name]
        self._tables[:rows, :width] = tables
        used = len(INPUTS) * self.max_rows + rows * self.max_blocks
        self.device[:used].copy_(self.host[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


@dataclass
class Captured:
    graph: Any  # replay()
    keep: Any  # what the captured launches address: the LoRA step plan, the paged decode plan


class DecodeGraphs:
    """The decode graphs of one engine: captured at start (`capture`), replayed by the model runner
    for steps of decode rows only (`takes`, `run`)."""

    def __init__(self, forward: Forward, kv_layers: list, lora: LoraLayers | None, kernels: Any, *,
                 max_rows: int, max_blocks: int, block_size: int, hidden_size: int, dtype: torch.dtype,
                 trash_slot: int, device: torch.device, api: GraphApi | None = None) -> None:
        self.forward, self.kv_layers, self.lora, self.kernels = forward, kv_layers, lora, kernels
        self.block_size, self.device = block_size, device
        self.max_context = max_blocks * block_size  # the paged kernel's plan fits every context
        self.sizes = buckets(max_rows)
        self.inputs = StaticInputs(max_rows, max_blocks, trash_slot, device)
        self.output = torch.zeros(max_rows, hidden_size, dtype=dtype, device=device)
        self.rows = torch.arange(max_rows, device=device)
        self.api = api if api is not None else TorchGraphs()
        self.graphs: dict[tuple[int, bool], Captured] = {}
        self._lora_version = -1

    def capture(self) -> float:
        """Capture every bucket, with and without LoRA (largest first); returns the seconds taken."""
        started = time.monotonic()
        pool = self.api.pool()
        with torch.inference_mode():  # as the model runner runs the steps
            self._capture_all(pool)
        return time.monotonic() - started

    def _capture_all(self, pool: Any) -> None:
        for bucket in reversed(self.sizes):
            for with_lora in ((True, False) if self.lora is not None else (False,)):
                self.inputs.pad(bucket)
                kept: dict = {}  # the last run's (the capture's) plans
                forward = functools.partial(self._capture_forward, bucket, with_lora, kept)
                self.graphs[(bucket, with_lora)] = Captured(self.api.capture(forward, pool), kept)

    def _capture_forward(self, bucket: int, with_lora: bool, kept: dict) -> None:
        kept["plans"] = self._forward(bucket, with_lora)

    def takes(self, decode_rows: int, rows: int) -> bool:
        """Whether a step of `rows` rows, the first `decode_rows` of them decode rows, replays a graph."""
        return decode_rows == rows and bucket_for(rows, self.sizes) is not None

    def run(self, ids: np.ndarray, positions: np.ndarray, cache_index: np.ndarray, tables: np.ndarray,
            ctx_lens: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """The hidden states [rows, hidden] of a decode step (one token per row), from its graph. The
        result is a view of the static output: read it before the next replay."""
        rows = len(ids)
        bucket = bucket_for(rows, self.sizes)
        with_lora = self.lora is not None and bool((slots >= 0).any())
        self.inputs.fill(bucket, dict(ids=ids, positions=positions, cache_index=cache_index, ctx_lens=ctx_lens,
                                      slots=slots), tables)
        if with_lora and self.lora.version != self._lora_version:  # slots changed since the last replay
            self.lora.context.backend.refresh()
            self._lora_version = self.lora.version
        self.graphs[(bucket, with_lora)].graph.replay()
        return self.output[:rows]

    def _forward(self, bucket: int, with_lora: bool) -> tuple:
        """The captured work: the model on the static inputs of `bucket` rows, into the static output."""
        view = {name: values[:bucket] for name, values in self.inputs.views.items()}
        tables = self.inputs.tables[:bucket]
        meta = AttentionMetadata(
            cache_index=view["cache_index"], decode_tokens=self.rows[:bucket], decode_blocks=tables.reshape(-1),
            decode_masks={}, block_size=self.block_size, prefill_rows=[],
            paged_decode=PagedDecode.build(self.kernels, tables, view["ctx_lens"], self.max_context, self.block_size))
        plan = None
        if with_lora:
            backend = self.lora.context.backend
            plan = backend.plan_graph(view["slots"].to(torch.int32))
            with self.lora.context.step(plan.batch, plan):
                hidden = self.forward(view["ids"], view["positions"], self.kv_layers, meta)
        else:
            hidden = self.forward(view["ids"], view["positions"], self.kv_layers, meta)
        self.output[:bucket].copy_(hidden)
        return plan, meta.paged_decode


def decode_graphs(mode: str, device: torch.device, kernels: Any, kv_cache: KVCache,
                  build: Callable[[int], DecodeGraphs]) -> DecodeGraphs | None:
    """The engine's decode graphs as parameter `cuda_graphs` asks, captured; None runs decode eagerly.

    Nothing on a CPU device. Without our kernels, or when the capture fails: `auto` logs one line and
    returns None, `on` raises ConfigError with the reason. `build(trash_slot)` makes the (uncaptured)
    graphs; the padded rows' KV slot is in a block held back from `kv_cache` (given back when the
    capture fails)."""
    if mode not in CUDA_GRAPH_MODES:
        raise ConfigError(f"parameter 'cuda_graphs' must be auto, on or off, got {mode!r}")
    if mode == "off" or device.type != "cuda":
        return None
    if kernels is None:
        return _refuse(mode, "they need our CUDA kernels (cuda_kernels is off, or they did not load)")
    trash = kv_cache.hold_back(1)
    if trash is None:
        return _refuse(mode, "the KV cache has no block to spare for the padded rows")
    try:
        graphs = build(trash[0] * kv_cache.block_size)
        seconds = graphs.capture()
    except Exception as exc:
        kv_cache.give_back(trash)
        return _refuse(mode, f"capture failed: {type(exc).__name__}: {exc}")
    log.info("CUDA graphs: %d decode graphs captured in %.1f s (batch sizes %s)", len(graphs.graphs), seconds,
             ", ".join(map(str, graphs.sizes)))
    return graphs


def _refuse(mode: str, reason: str) -> None:
    if mode == "on":
        raise ConfigError(f"parameter cuda_graphs=on, but CUDA graphs cannot be used: {reason}. "
                          "Set it to auto (decode runs eagerly then) or off")
    log.warning("CUDA graphs off, decode steps run eagerly (cuda_graphs=auto): %s", reason)
    return None
