"""Where adapters live while serving: loading in the background, a host LRU cache, device slots.

Tiers: disk (`adapter_dir`) -> host memory (`max_cpu_loras`, LRU) -> device slots (`max_loras`,
LRU among those no running row uses). The engine loop never waits on a load: it asks for an
adapter, gets a Future, and admits the request once the Future is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..events import EngineEvents
from ..errors import AdapterNotFoundError, InvalidParameterError
from .adapter_files import WEIGHTS_FILE, LoraAdapter, load_adapter
from .adapter_ids import adapter_folder, check_adapter_id, list_local_adapters
from .hub import check_adapter_size, download_adapter
from .ops import LoraWeightTable

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory freed by evictions back to the OS.

    glibc raises its mmap threshold after large frees, so later adapter buffers come from the heap,
    whose freed pages it keeps: without a trim the process grows with every adapter that passes
    through the cache, although it holds no more of them (measured in bench/adapter_scale.py).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@dataclass(frozen=True)
class AdapterPolicy:
    max_rank: int
    max_bytes: int
    allowed: frozenset[str] | None  # None: any adapter in adapter_dir
    base_model_name: str | None  # compared with adapter_config's base_model_name_or_path
    allow_hub_download: bool = False  # ids `org/name[@rev]` missing locally are fetched into adapter_dir


class AdapterManager:
    def __init__(self, adapter_dir: str, tables: list[dict[str, LoraWeightTable]],
                 shapes: dict[str, tuple[int, int]], policy: AdapterPolicy, dtype: torch.dtype,
                 device: torch.device, max_loras: int, max_cpu_loras: int,
                 events: EngineEvents | None = None) -> None:
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._tables = tables
        self._shapes, self._policy, self._dtype, self._device = shapes, policy, dtype, device
        self.max_cpu_loras = max_cpu_loras
        self.events = events or EngineEvents()
        self._lock = threading.Lock()
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        # Device slots: changed by the engine thread only (unloads are queued for it).
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self._users: dict[str, int] = {}
        self._unload_requests: set[str] = set()

    # ---- host tier (thread-safe) ----
    def request(self, adapter_id: str) -> Future:
        """A Future of the loaded adapter; loads at most once however many requests ask."""
        check_adapter_id(adapter_id)
        if self._policy.allowed is not None and adapter_id not in self._policy.allowed:
            raise InvalidParameterError("adapter_id", f"adapter '{adapter_id}' is not in this server's adapter_allowlist")
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                self.events.cache("host", "hit")
                future: Future = Future()
                future.set_result(self._host[adapter_id])
                return future
            if adapter_id in self._loading:
                return self._loading[adapter_id]
            if self.adapter_dir is None:
                raise AdapterNotFoundError(f"unknown adapter '{adapter_id}': this server has no adapter_dir")
            try:
                folder: Path | None = adapter_folder(self.adapter_dir, adapter_id)  # unknown ids fail at once
            except AdapterNotFoundError:
                if not (self._policy.allow_hub_download and "/" in adapter_id):
                    raise
                folder = None  # fetched from the Hub in the load thread, never under the lock
            self.events.cache("host", "miss")
            future = self._pool.submit(self._load, adapter_id, folder)
            self._loading[adapter_id] = future
            return future

    def _load(self, adapter_id: str, folder: Path | None) -> LoraAdapter:
        started = time.monotonic()
        try:
            if folder is None:
                folder = download_adapter(adapter_id, self.adapter_dir, max_bytes=self._policy.max_bytes)
            weights = folder / WEIGHTS_FILE
            check_adapter_size(adapter_id, weights.stat().st_size if weights.exists() else 0, self._policy.max_bytes)
            adapter = load_adapter(adapter_id, folder, self._shapes, len(self._tables), self._policy.max_rank,
                                   self._dtype)
            self._warn_if_other_base(adapter)
        finally:
            with self._lock:
                self._loading.pop(adapter_id, None)
        with self._lock:
            self._host[adapter_id] = adapter
            self._evict_host()
        self.events.loaded(adapter_id, time.monotonic() - started, adapter.nbytes)
        return adapter

    def _warn_if_other_base(self, adapter: LoraAdapter) -> None:
        expected, declared = self._policy.base_model_name, adapter.base_model_name
        if expected and declared and Path(declared).name != Path(expected).name:
            log.warning("adapter '%s' says it was trained on '%s', this server's base model is '%s'; "
                        "its shapes fit, so it is served", adapter.adapter_id, declared, expected)

    def _evict_host(self) -> None:
        """Drop least recently used adapters above max_cpu_loras; never one in a device slot."""
        evicted = False
        for old in list(self._host):
            if len(self._host) <= self.max_cpu_loras:
                break
            if old not in self._slot_of:
                del self._host[old]
                evicted = True
                self.events.cache("host", "eviction")
        if evicted:
            release_freed_memory()

    def load(self, adapter_id: str, timeout: float) -> LoraAdapter:
        """Load (or find) an adapter now, for the management API and prefetching."""
        return self.request(adapter_id).result(timeout=timeout)

    def unload(self, adapter_id: str) -> bool:
        """Forget an adapter in host memory, and in its device slot once no running row uses it."""
        check_adapter_id(adapter_id)
        with self._lock:
            known = self._host.pop(adapter_id, None) is not None or adapter_id in self._slot_of
            if known:
                self._unload_requests.add(adapter_id)
        return known

    def listing(self) -> dict[str, list[str]]:
        with self._lock:  # an unloaded adapter leaves its device slot at the next step: not listed
            host, loading = list(self._host), list(self._loading)
            device = [a for a in self._slot_of if a not in self._unload_requests]
        disk = list_local_adapters(self.adapter_dir) if self.adapter_dir else []
        if self._policy.allowed is not None:
            disk = [a for a in disk if a in self._policy.allowed]
        return {"disk": disk, "host": host, "device": device, "loading": loading}

    # ---- device tier (engine thread only) ----
    def acquire_slot(self, adapter: LoraAdapter) -> int | None:
        """Pin `adapter` in a device slot for one more running row; None when every slot is pinned."""
        adapter_id = adapter.adapter_id
        slot = self._slot_of.get(adapter_id)
        if slot is None:
            self.events.cache("device", "miss")
            slot = self._free_slot()
            if slot is None:
                return None
            self._install(slot, adapter)
            self._slot_of[adapter_id] = slot
        else:
            self.events.cache("device", "hit")
        self._slot_of.move_to_end(adapter_id)
        self._users[adapter_id] = self._users.get(adapter_id, 0) + 1
        return slot

    def release_slot(self, adapter_id: str) -> None:
        self._users[adapter_id] -= 1
        if not self._users[adapter_id]:
            del self._users[adapter_id]
        self.apply_unloads()

    def apply_unloads(self) -> None:
        """Free the slots of unloaded adapters that no running row uses any more."""
        with self._lock:
            pending = [a for a in self._unload_requests if a not in self._users]
            self._unload_requests.difference_update(pending)
        for adapter_id in pending:
            slot = self._slot_of.pop(adapter_id, None)
            if slot is not None:
                self._install(slot, None)
                self._free_slots.append(slot)

    def resident_counts(self) -> dict[str, int]:
        """Lock-free sizes of the memory tiers (called from inside event callbacks)."""
        return {"host": len(self._host), "device": len(self._slot_of)}

    def _free_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for adapter_id in self._slot_of:  # least recently used first
            if adapter_id not in self._users:
                slot = self._slot_of.pop(adapter_id)
                self._install(slot, None)
                self.events.cache("device", "eviction")
                with self._lock:
                    self._evict_host()
                return slot
        return None

    def _install(self, slot: int, adapter: LoraAdapter | None) -> None:
        if adapter is not None:
            adapter = adapter.to(self._device)
        for layer, tables in enumerate(self._tables):
            for proj, table in tables.items():
                pair = adapter.weights.get((layer, proj)) if adapter else None
                if pair is None:
                    table.set_slot(slot, None, None)
                else:
                    table.set_slot(slot, pair[0], pair[1])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
