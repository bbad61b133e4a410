"""What the engine reports as it runs, for metrics; the default ignores everything.

The Triton glue passes a subclass that feeds Prometheus (multilora.triton.metrics); tests and
benchmarks use this one.
"""
from __future__ import annotations


class EngineEvents:
    def cache(self, tier: str, event: str) -> None:
        """An adapter cache event; tier: 'host' | 'device', event: 'hit' | 'miss' | 'eviction'."""

    def loaded(self, adapter_id: str, seconds: float, nbytes: int) -> None:
        """An adapter finished loading from disk into host memory."""

    def scheduler_state(self, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        """After each engine step that changed who runs."""
