"""Prometheus metrics on Triton's metrics port, through the Python backend's MetricFamily API.

`pb_utils` is passed in rather than imported so this module stays importable (and testable with a
stand-in) outside the Triton stub.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ..events import EngineEvents

BASE_MODEL_LABEL = "__base__"
LOAD_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class LoraMetrics(EngineEvents):
    def __init__(self, pb_utils: Any, residency: Callable[[], dict[str, int]]) -> None:
        family = pb_utils.MetricFamily
        # Families must outlive their metrics (a deleted family breaks increment), so keep them here.
        self._requests = family("lora_requests_total", "Requests finished, per adapter", family.COUNTER)
        self._tokens = family("lora_generated_tokens_total", "Tokens generated, per adapter", family.COUNTER)
        self._errors = family("lora_request_errors_total", "Requests that ended in an error, per adapter",
                              family.COUNTER)
        self._load = family("lora_adapter_load_seconds", "Time to load an adapter from disk into host memory",
                            family.HISTOGRAM)
        self._cache = family("lora_adapter_cache_events_total", "Adapter cache hits, misses and evictions per tier",
                             family.COUNTER)
        self._resident = family("lora_adapters_resident", "Adapters resident per tier (host memory, device slots)",
                                family.GAUGE)
        self._scheduler = family("lora_scheduler_state", "Requests running and waiting, KV cache blocks used and total",
                                 family.GAUGE)
        self._load_metric = self._load.Metric(labels={}, buckets=LOAD_BUCKETS)
        self._metrics: dict[tuple, Any] = {}
        # One metric call at a time: the backend's metric IPC is not safe from several threads at
        # once (the engine loop, adapter loaders and Triton's threads all report); tritonserver
        # crashed with SIGSEGV in libtriton_python.so without this under adapter churn.
        self._lock = threading.RLock()
        self._residency = residency
        # Zero before the first engine step: "nothing running" must be readable from the start
        # (the launcher's shutdown waits for it, multilora.launcher.server).
        for what in ("running", "waiting"):
            self._metric(self._scheduler, state=what).set(0)

    def _metric(self, family: Any, **labels: str) -> Any:
        """Call with self._lock held."""
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = family.Metric(labels=labels)
        return self._metrics[key]

    def request_finished(self, adapter_id: str | None, completion_tokens: int, error: bool) -> None:
        label = adapter_id or BASE_MODEL_LABEL
        with self._lock:
            self._metric(self._requests, adapter=label).increment(1)
            if completion_tokens:
                self._metric(self._tokens, adapter=label).increment(completion_tokens)
            if error:
                self._metric(self._errors, adapter=label).increment(1)

    def cache(self, tier: str, event: str) -> None:
        with self._lock:
            self._metric(self._cache, tier=tier, event=event).increment(1)
            self.update_residency()

    def loaded(self, adapter_id: str, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._load_metric.observe(seconds)
            self.update_residency()

    def scheduler_state(self, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        with self._lock:
            for what, value in (("running", running), ("waiting", waiting), ("kv_blocks_used", kv_blocks_used),
                                ("kv_blocks_total", kv_blocks_total)):
                self._metric(self._scheduler, state=what).set(value)

    def update_residency(self) -> None:
        with self._lock:
            for tier, count in self._residency().items():
                self._metric(self._resident, tier=tier).set(count)
