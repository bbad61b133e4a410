"""The engine's state as metrics report it: a pure function of the scheduler, KV cache and adapter tiers.

Taken on the engine thread (the owner of all of them) at the end of every step. It walks the
running and waiting sequences once, as admission already does each step, and the two adapter
tiers (at most max_loras and about max_cpu_loras entries), so it costs microseconds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..events import EngineSnapshot

if TYPE_CHECKING:
    from ..adapters.slots import LoraSlots
    from ..adapters.store import AdapterStore
    from .kv_cache import KVCache
    from .scheduler import Scheduler


def take_snapshot(scheduler: Scheduler, kv_cache: KVCache, slots: LoraSlots, adapters: AdapterStore) -> EngineSnapshot:
    running = {s.request.adapter_id for s in scheduler.running if s.request.adapter_id}
    waiting = {s.request.adapter_id for s in scheduler.waiting if s.request.adapter_id} - running
    device = slots.residency()
    in_slots = {adapter_id for adapter_id, _ in device}
    return EngineSnapshot(
        running=len(scheduler.running),
        waiting=len(scheduler.waiting),
        kv_blocks_used=kv_cache.num_blocks - kv_cache.num_free,
        kv_blocks_total=kv_cache.num_blocks,
        running_adapters=tuple(sorted(running)),
        waiting_adapters=tuple(sorted(waiting)),
        device_capacity=slots.num_slots,
        host_capacity=adapters.host_capacity,
        device=tuple(sorted(device)),
        # A host copy whose adapter holds a slot is protected from eviction (AdapterStore.poll).
        host=tuple(sorted((adapter_id, adapter_id in in_slots) for adapter_id in adapters.host_adapters())),
    )
