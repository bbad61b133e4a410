"""What the engine reports as it runs, for metrics; the default ignores everything.

The Triton glue passes a subclass that feeds Prometheus (multilora.triton.metrics); tests and
benchmarks use this one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after a step, as a load balancer would score it (docs/metrics.md).

    Taken on the engine thread at the end of every step (engine/snapshot.py); the engine reports a
    new one only when something in it changed. Adapter ids are sorted, so equal states compare
    equal whatever order requests arrived in.
    """

    running: int  # sequences running (each holds a row, KV blocks and, with an adapter, a device slot;
    # a request with n choices is n of them)
    waiting: int  # requests queued in the engine: for rows, KV blocks, an adapter load or a slot
    kv_blocks_used: int  # reserved by running requests (prompt + max_tokens, at admission)
    kv_blocks_total: int
    running_adapters: tuple[str, ...]  # adapters of running requests
    waiting_adapters: tuple[str, ...]  # adapters of waiting requests, but for those already running
    device_capacity: int  # device slots (max_loras)
    host_capacity: int  # adapters the host tier keeps (max_cpu_loras)
    device: tuple[tuple[str, bool], ...]  # (adapter, pinned by a running request) for each device slot in use
    host: tuple[tuple[str, bool], ...]  # (adapter, pinned: holds a device slot, so not evictable) in host memory

    @property
    def kv_cache_usage(self) -> float:
        """Reserved KV blocks as a fraction (0-1) of all blocks."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineEvents:
    def cache(self, tier: str, event: str) -> None:
        """An adapter cache event; tier: 'host' | 'device', event: 'hit' | 'miss' | 'eviction'."""

    def loaded(self, adapter_id: str, seconds: float, nbytes: int) -> None:
        """An adapter finished loading from disk into host memory."""

    def state(self, snapshot: EngineSnapshot) -> None:
        """After an engine step that changed the snapshot (and once when the engine is built)."""
