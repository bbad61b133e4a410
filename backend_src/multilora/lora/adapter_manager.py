"""Where adapters live while serving: loading in the background, a host LRU cache, device slots.

Tiers: disk (`adapter_dir`) -> host memory (`max_cpu_loras`, LRU) -> device slots (`max_loras`,
LRU among those no running row uses). The engine loop never waits on a load: it asks for an
adapter, gets a Future, and admits the request once the Future is done.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..errors import AdapterNotFoundError
from .adapter_files import LoraAdapter, load_adapter
from .adapter_ids import adapter_folder, check_adapter_id
from .ops import LoraWeightTable

Loader = Callable[[str], LoraAdapter]


class AdapterManager:
    def __init__(self, adapter_dir: str, tables: list[dict[str, LoraWeightTable]],
                 shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
                 device: torch.device, max_loras: int, max_cpu_loras: int) -> None:
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._tables = tables
        self._shapes, self._max_rank, self._dtype, self._device = shapes, max_rank, dtype, device
        self.max_cpu_loras = max_cpu_loras
        self._lock = threading.Lock()
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        # Device slots: only the engine thread touches these.
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self._users: dict[str, int] = {}

    # ---- host tier (thread-safe) ----
    def request(self, adapter_id: str) -> Future:
        """A Future of the loaded adapter; loads at most once however many requests ask."""
        check_adapter_id(adapter_id)
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                future: Future = Future()
                future.set_result(self._host[adapter_id])
                return future
            if adapter_id in self._loading:
                return self._loading[adapter_id]
            if self.adapter_dir is None:
                raise AdapterNotFoundError(f"unknown adapter '{adapter_id}': this server has no adapter_dir")
            folder = adapter_folder(self.adapter_dir, adapter_id)  # unknown ids fail here, at once
            future = self._pool.submit(self._load, adapter_id, folder)
            self._loading[adapter_id] = future
            return future

    def _load(self, adapter_id: str, folder: Path) -> LoraAdapter:
        try:
            adapter = load_adapter(adapter_id, folder, self._shapes, len(self._tables), self._max_rank, self._dtype)
        finally:
            with self._lock:
                self._loading.pop(adapter_id, None)
        with self._lock:
            self._host[adapter_id] = adapter
            self._evict_host()
        return adapter

    def _evict_host(self) -> None:
        for old in list(self._host):
            if len(self._host) <= self.max_cpu_loras:
                break
            if old not in self._slot_of:
                del self._host[old]

    def host_adapters(self) -> list[str]:
        with self._lock:
            return list(self._host)

    # ---- device tier (engine thread only) ----
    def acquire_slot(self, adapter: LoraAdapter) -> int | None:
        """Pin `adapter` in a device slot for one more running row; None when every slot is pinned."""
        adapter_id = adapter.adapter_id
        slot = self._slot_of.get(adapter_id)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._install(slot, adapter)
            self._slot_of[adapter_id] = slot
        self._slot_of.move_to_end(adapter_id)
        self._users[adapter_id] = self._users.get(adapter_id, 0) + 1
        return slot

    def release_slot(self, adapter_id: str) -> None:
        self._users[adapter_id] -= 1
        if not self._users[adapter_id]:
            del self._users[adapter_id]

    def device_adapters(self) -> list[str]:
        return list(self._slot_of)

    def _free_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for adapter_id in self._slot_of:  # least recently used first
            if adapter_id not in self._users:
                slot = self._slot_of.pop(adapter_id)
                self._install(slot, None)
                with self._lock:
                    self._evict_host()
                return slot
        return None

    def _install(self, slot: int, adapter: LoraAdapter | None) -> None:
        for layer, tables in enumerate(self._tables):
            for proj, table in tables.items():
                pair = adapter.weights.get((layer, proj)) if adapter else None
                if pair is None:
                    table.set_slot(slot, None, None)
                else:
                    table.set_slot(slot, pair[0].to(self._device), pair[1].to(self._device))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
