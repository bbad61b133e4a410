"""The host tier of adapters: loaded adapters kept in memory (LRU), and the loads in flight.

Owned by the engine thread: requests, management commands and evictions all arrive there, in
order, so an `unload` takes effect for every request that reaches the engine after it (a later
request reloads the files from disk, never reuses what was unloaded). Loads run off the engine
thread (loader.py); their results join the cache at the next `poll`. A cached adapter's files
are looked at again when requests for it arrive, at most once per `check_interval_s`
(freshness.py): one deleted or replaced on disk is read again, so it fails or changes for new
requests without an `unload`.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterLoadError, AdapterNotFoundError, InvalidParameterError
from ..events import EngineEvents
from ..hub_ids import is_hub_id
from ..models.families import LoraTargetShape
from .files import LoraAdapter, files_identity, load_adapter
from .freshness import FreshnessChecks
from .hub import download_adapter
from .ids import adapter_folder, check_adapter_id, list_local_adapters
from .loader import AdapterLoader, Load, complete_once
from .memory import release_freed_memory

log = logging.getLogger(__name__)
DISK_LISTING_TTL_S = 2.0  # `list` answers from a scan at most this old: listing is cheap to call


@dataclass(frozen=True)
class AdapterPolicy:
    max_rank: int
    max_bytes: int
    allowed: frozenset[str] | None  # None: any adapter in adapter_dir
    base_model_name: str | None  # compared with adapter_config's base_model_name_or_path
    allow_hub_download: bool = False  # ids `org/name[@rev]` missing locally are fetched into adapter_dir


class AdapterStore:
    def __init__(self, adapter_dir: str, *, targets: dict[str, LoraTargetShape], num_layers: int,
                 policy: AdapterPolicy, dtype: torch.dtype, host_capacity: int, load_timeout_s: float,
                 max_loads: int = 4, loads_per_s: float = 0.0, stall_s: float = 5.0, max_stalled: int = 16,
                 check_interval_s: float = 1.0, on_load_done: Callable[[], None] = lambda: None,
                 events: EngineEvents | None = None) -> None:
        """`host_capacity`: adapters the host tier keeps (parameter max_cpu_loras); `stall_s` and
        `max_stalled`: see loader.py; `check_interval_s`: how often a cached adapter's files are
        looked at (0: never); `on_load_done` is called from a load or look thread when it ends."""
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._targets, self._num_layers, self._policy, self._dtype = targets, num_layers, policy, dtype
        self.host_capacity = host_capacity
        self.load_timeout_s = load_timeout_s
        self.events = events or EngineEvents()
        self.loader = AdapterLoader(self.read, max_loads, loads_per_s, on_load_done, stall_s=stall_s,
                                    max_stalled=max_stalled)
        self._checks = FreshnessChecks(lambda adapter_id: adapter_folder(self.adapter_dir, adapter_id),
                                       check_interval_s, on_load_done)
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, Load] = {}
        self._disk: tuple[float, list[str]] | None = None

    # ---- engine thread ----
    def request(self, adapter_id: str) -> Future:
        """A Future of the loaded adapter; one load however many requests ask. Bad ids, ids outside
        the allow-list and adapters whose last load is still stuck on its files raise at once."""
        check_adapter_id(adapter_id)
        if self._policy.allowed is not None and adapter_id not in self._policy.allowed:
            raise InvalidParameterError(
                "adapter_id", f"adapter '{adapter_id}' is not in this server's adapter_allowlist")
        self._require_adapter_dir(adapter_id)
        if adapter_id in self._host:
            self._host.move_to_end(adapter_id)
            self.events.cache("host", "hit")
            adapter = self._host[adapter_id]
            looking = self._checks.look(adapter, time.monotonic())
            if looking is not None:  # its files are due a look: the request waits for the answer
                return looking
            future: Future = Future()
            future.set_result(adapter)
            return future
        if adapter_id not in self._loading:
            stuck = self.loader.blocked_load(adapter_id)
            if stuck is not None:  # another thread on the same hung files would only add to them
                raise AdapterLoadError(
                    f"adapter '{adapter_id}' cannot be loaded now: its previous load has waited on its files for "
                    f"{time.monotonic() - stuck.started:.0f} s (abandoned at adapter_load_timeout_s "
                    f"{self.load_timeout_s:g} s); it is tried again once that read returns")
            self.events.cache("host", "miss")
            self._loading[adapter_id] = self.loader.submit(adapter_id)
        return self._loading[adapter_id].future

    def poll(self, protected: set[str] = frozenset()) -> list[str]:
        """Adopt finished loads into the host cache, time out stalled ones, start queued ones, act on
        the looks at cached adapters' files. `protected`: ids that must stay cached (they hold
        device slots). Returns the ids whose files were found changed or gone: the caller drops
        what else it keeps of them (their device slots)."""
        now = time.monotonic()
        changed = [self._files_changed(look.adapter, look.future) for look in self._checks.poll(now)]
        for adapter_id, load in list(self._loading.items()):
            if not load.future.done() and load.started is not None and now - load.started > self.load_timeout_s:
                self.loader.abandon(load, AdapterLoadError(
                    f"adapter '{adapter_id}' did not load within adapter_load_timeout_s ({self.load_timeout_s:g} s)"))
            if load.future.done():
                del self._loading[adapter_id]
                if load.future.exception() is None:
                    adapter = load.future.result()
                    self._host[adapter_id] = adapter
                    self._checks.loaded(adapter_id, load.started or now)
                    self.events.loaded(adapter_id, now - (load.started or now), adapter.nbytes)
        self._evict(protected)
        self.loader.dispatch()
        return changed

    def _files_changed(self, adapter: LoraAdapter, waiting: Future) -> str:
        """Drop the cached copy whose files changed; the requests `waiting` on the look get a fresh read."""
        adapter_id = adapter.adapter_id
        log.info("adapter '%s': its files changed or are gone; dropping the copy in memory", adapter_id)
        if self._host.get(adapter_id) is adapter:
            del self._host[adapter_id]
        self._disk = None  # the next `list` scans adapter_dir again
        if not waiting.done():  # else they were given the cached copy: storage answered too late
            if adapter_id not in self._loading:
                self._loading[adapter_id] = self.loader.submit(adapter_id, waiting)
            else:  # requested again meanwhile (it was unloaded or evicted): they join that load
                self._loading[adapter_id].future.add_done_callback(lambda load: complete_once(
                    waiting, result=None if load.exception() else load.result(), exception=load.exception()))
        return adapter_id

    def unload(self, adapter_id: str) -> bool:
        """Forget an adapter: later requests load it from disk again. In-flight loads of it are
        dropped (their waiting requests still get them). Returns whether it was known."""
        check_adapter_id(adapter_id)
        known = self._host.pop(adapter_id, None) is not None
        known |= self._loading.pop(adapter_id, None) is not None
        self._checks.forget(adapter_id)
        return known

    def listing(self) -> dict[str, list[str]]:
        """The tiers as they are now: a load that ended since the last `poll` counts as what it
        became (in memory, or gone when it failed), not as still loading."""
        ended = {a: load.future for a, load in self._loading.items() if load.future.done()}
        loaded = [a for a, future in ended.items() if future.exception() is None and a not in self._host]
        return {"disk": self.disk_adapters(), "host": [*self._host, *loaded],
                "loading": [a for a in self._loading if a not in ended]}

    def disk_adapters(self) -> list[str]:
        """Ids in adapter_dir (and the allow-list), from a scan at most DISK_LISTING_TTL_S old."""
        now = time.monotonic()
        if self._disk is None or now - self._disk[0] > DISK_LISTING_TTL_S:
            disk = list_local_adapters(self.adapter_dir) if self.adapter_dir else []
            if self._policy.allowed is not None:
                disk = [a for a in disk if a in self._policy.allowed]
            self._disk = (now, disk)
        return self._disk[1]

    def host_adapters(self) -> list[str]:
        """Ids in the host tier, least recently used first."""
        return list(self._host)

    def _evict(self, protected: set[str]) -> None:
        """Drop least recently used adapters above the host tier's capacity; never a protected one."""
        evicted = False
        for old in list(self._host):
            if len(self._host) <= self.host_capacity:
                break
            if old not in protected:
                del self._host[old]
                self._checks.forget(old)
                evicted = True
                self.events.cache("host", "eviction")
        if evicted:
            release_freed_memory()

    def check_known(self, adapter_id: str) -> None:
        """Raise AdapterNotFoundError unless adapter_dir holds this adapter (a quick look on disk) or
        it may still come from the Hub."""
        self._require_adapter_dir(adapter_id)
        if not (self._policy.allow_hub_download and is_hub_id(adapter_id)):
            adapter_folder(self.adapter_dir, adapter_id)

    def _require_adapter_dir(self, adapter_id: str) -> None:
        if self.adapter_dir is None:
            raise AdapterNotFoundError(f"unknown adapter '{adapter_id}': this server has no adapter_dir")

    # ---- load threads ----
    def read(self, adapter_id: str) -> LoraAdapter:
        """Find (or download) and read one adapter; runs in a load thread, touches no shared state."""
        try:
            folder = adapter_folder(self.adapter_dir, adapter_id)
        except AdapterNotFoundError:
            if not (self._policy.allow_hub_download and "/" in adapter_id):
                raise
            folder = download_adapter(adapter_id, self.adapter_dir, max_bytes=self._policy.max_bytes)
        identity = files_identity(folder)  # before reading: a change during the read shows at the next look
        adapter = load_adapter(adapter_id, folder, self._targets, self._num_layers, self._policy.max_rank,
                               self._dtype, root=self.adapter_dir, max_bytes=self._policy.max_bytes)
        expected, declared = self._policy.base_model_name, adapter.base_model_name
        if expected and declared and Path(declared).name != Path(expected).name:
            log.warning("adapter '%s' says it was trained on '%s', this server's base model is '%s'; "
                        "its shapes fit, so it is served", adapter_id, declared, expected)
        adapter.files = identity
        return adapter
