"""Prometheus metrics on Triton's metrics port, through the Python backend's MetricFamily API.

Names, types and meanings: docs/metrics.md. Two kinds:
- counters and a histogram fed by events as they happen (requests, tokens, errors, cache events,
  load times), with adapter label values bounded by AdapterLabels;
- gauges of the engine's state, published from the snapshot the engine takes after each step
  (multilora.engine.snapshot): what a load balancer scores a replica by (the Gateway API Inference
  Extension's model server protocol: waiting, running, KV cache use, and the LoRA info gauge) and
  where each adapter is resident.

`pb_utils` is passed in rather than imported so this module stays importable (and testable with a
stand-in) outside the Triton stub.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from ..events import EngineEvents, EngineSnapshot
from .adapter_labels import AdapterLabels
from .metric_series import Labels, MetricSeries, labels_key

LOAD_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TIERS = ("device", "host")


def info_labels(snapshot: EngineSnapshot) -> Labels:
    """The LoRA info gauge's labels, in the shape of vLLM's vllm:lora_requests_info."""
    return labels_key(running_lora_adapters=",".join(snapshot.running_adapters),
                      waiting_lora_adapters=",".join(snapshot.waiting_adapters),
                      max_lora=str(snapshot.device_capacity))


def residency(snapshot: EngineSnapshot) -> dict[Labels, float]:
    """One series per adapter and tier it is resident in, pinned or not."""
    return {labels_key(adapter=adapter_id, tier=tier, pinned="true" if pinned else "false"): 1.0
            for tier, entries in (("device", snapshot.device), ("host", snapshot.host))
            for adapter_id, pinned in entries}


def tier_counts(snapshot: EngineSnapshot) -> dict[str, dict[str, int]]:
    """Per tier: its capacity, the adapters resident, and those pinned."""
    capacity = {"device": snapshot.device_capacity, "host": snapshot.host_capacity}
    entries = {"device": snapshot.device, "host": snapshot.host}
    return {tier: {"capacity": capacity[tier], "resident": len(entries[tier]),
                   "pinned": sum(pinned for _, pinned in entries[tier])} for tier in TIERS}


class LoraMetrics(EngineEvents):
    def __init__(self, pb_utils: Any, *, max_cpu_loras: int) -> None:
        """`max_cpu_loras`: the host tier's capacity, which also bounds how many adapters no longer
        in memory keep their own label values (AdapterLabels)."""
        def series(name: str, description: str, kind: str, buckets: list[float] | None = None) -> MetricSeries:
            return MetricSeries(pb_utils, name, description, kind, buckets)

        self._requests = series("lora_requests_total", "Requests finished, per adapter", "COUNTER")
        self._tokens = series("lora_generated_tokens_total", "Tokens generated, per adapter", "COUNTER")
        self._errors = series("lora_request_errors_total", "Requests that ended in an error, per adapter", "COUNTER")
        self._per_adapter = (self._requests, self._tokens, self._errors)
        self._load = series("lora_adapter_load_seconds", "Time to load an adapter from disk into host memory",
                            "HISTOGRAM", LOAD_BUCKETS)
        self._cache = series("lora_adapter_cache_events_total", "Adapter cache hits, misses and evictions per tier",
                             "COUNTER")
        self._scheduler = series("lora_scheduler_state", "Requests running and waiting, KV cache blocks used and total",
                                 "GAUGE")
        self._kv_usage = series("lora_kv_cache_usage", "KV cache blocks reserved by running requests, 0-1", "GAUGE")
        self._info = series("lora_requests_info", "Adapters of running and waiting requests, and max_lora (device "
                                                  "slots); the value is when these labels took effect (Unix time)",
                            "GAUGE")
        self._residency = series("lora_adapter_residency", "1 per adapter resident in a tier (device slots, host "
                                                           "memory), pinned or not", "GAUGE")
        self._resident = series("lora_adapters_resident", "Adapters resident per tier (host memory, device slots)",
                                "GAUGE")
        self._capacity = series("lora_adapter_capacity", "Adapters a tier holds at most (max_loras, max_cpu_loras)",
                                "GAUGE")
        self._pinned = series("lora_adapters_pinned", "Resident adapters a tier cannot evict now", "GAUGE")
        self._labels = AdapterLabels(max_cpu_loras)
        # One metric call at a time: the backend's metric IPC is not safe from several threads at
        # once (the engine loop, adapter loaders and Triton's threads all report); tritonserver
        # crashed with SIGSEGV in libtriton_python.so without this under adapter churn.
        self._lock = threading.RLock()
        # Zero before the engine exists: "nothing running" must be readable from the start (the
        # launcher's shutdown waits for it, multilora.launcher.server).
        with self._lock:
            for what in ("running", "waiting"):
                self._scheduler.set(labels_key(state=what), 0)

    # ---- events, as they happen ----
    def request_finished(self, adapter_id: str | None, completion_tokens: int, error: bool) -> None:
        """A request ended; `completion_tokens`: those of its final response (a streamed request
        with n > 1 counts each other choice's with tokens_generated as it ends)."""
        with self._lock:
            key = labels_key(adapter=self._labels.label(adapter_id))
            self._requests.metric(key).increment(1)
            self.tokens_generated(adapter_id, completion_tokens)
            if error:
                self._errors.metric(key).increment(1)

    def tokens_generated(self, adapter_id: str | None, count: int) -> None:
        with self._lock:
            if count:
                self._tokens.metric(labels_key(adapter=self._labels.label(adapter_id))).increment(count)

    def cache(self, tier: str, event: str) -> None:
        with self._lock:
            self._cache.metric(labels_key(tier=tier, event=event)).increment(1)

    def loaded(self, adapter_id: str, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._load.metric(()).observe(seconds)
            self._drop_labels(self._labels.loaded(adapter_id))

    # ---- the engine's state, after each step that changed it ----
    def state(self, snapshot: EngineSnapshot) -> None:
        with self._lock:
            for what, value in (("running", snapshot.running), ("waiting", snapshot.waiting),
                                ("kv_blocks_used", snapshot.kv_blocks_used),
                                ("kv_blocks_total", snapshot.kv_blocks_total)):
                self._scheduler.set(labels_key(state=what), value)
            self._kv_usage.set((), snapshot.kv_cache_usage)
            info = info_labels(snapshot)
            if info not in self._info.keys():  # its value says since when: set once per label set
                self._info.sync({info: time.time()})
            self._residency.sync(residency(snapshot))
            for tier, counts in tier_counts(snapshot).items():
                key = labels_key(tier=tier)
                self._capacity.set(key, counts["capacity"])
                self._resident.set(key, counts["resident"])
                self._pinned.set(key, counts["pinned"])
            held = frozenset(adapter_id for adapter_id, _ in snapshot.host + snapshot.device)
            self._drop_labels(self._labels.held(held))

    def _drop_labels(self, adapter_ids: list[str]) -> None:
        for adapter_id in adapter_ids:
            for counter in self._per_adapter:
                counter.remove(labels_key(adapter=adapter_id))
