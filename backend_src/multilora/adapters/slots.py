"""The device tier: which adapters sit in the LoRA layers' slots, and which rows pin them.

Owned by the engine thread. A slot holds one loaded adapter (identified by the LoraAdapter object,
not only its id: after an unload and reload the new weights get a slot of their own while rows
still running on the old ones keep theirs until they finish). Slots used by running rows are
pinned; the others are recycled least recently used first.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig
from ..events import EngineEvents
from ..models.families import LoraTargetShape
from .files import LoraAdapter

if TYPE_CHECKING:
    from ..lora.layers import LoraLayers

log = logging.getLogger(__name__)
AUTO_GPU_MEMORY_FRACTION = 0.5  # of what the model and KV cache leave: the rest stays for activations


def slot_count(config: EngineConfig, device: torch.device, targets: dict[str, LoraTargetShape], num_layers: int,
               dtype: torch.dtype) -> int:
    """How many slots: max_loras as set, or for `auto` what fits (call it once the KV cache is allocated)."""
    fixed = config.fixed_max_loras
    if fixed is not None:
        return fixed
    if device.type != "cuda":
        count = min(config.max_num_seqs, config.max_cpu_loras)
        log.info("max_loras=auto: %d slots on CPU (one per running row, max_num_seqs %d, at most max_cpu_loras "
                 "%d); a slot points at the adapter in host memory, it holds no copy", count, config.max_num_seqs,
                 config.max_cpu_loras)
        return count
    per_slot = num_layers * sum(t.h_in + t.h_out for t in targets.values()) * config.max_lora_rank * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0]
    count = max(1, min(config.max_cpu_loras, int(free * AUTO_GPU_MEMORY_FRACTION) // per_slot))
    log.info("max_loras=auto: %d slots on %s (%.1f GiB free after the model and KV cache, %.1f MiB per adapter of "
             "rank %d on every projection; at most max_cpu_loras %d)", count, device, free / 2**30, per_slot / 2**20,
             config.max_lora_rank, config.max_cpu_loras)
    return count


class LoraSlots:
    def __init__(self, layers: LoraLayers, num_slots: int, device: torch.device,
                 events: EngineEvents | None = None) -> None:
        self._layers = layers
        self._device = device
        self.num_slots = num_slots
        self.events = events or EngineEvents()
        self._slot_of: OrderedDict[str, tuple[int, LoraAdapter]] = OrderedDict()  # LRU order
        self._users = [0] * num_slots
        self._retired: set[int] = set()  # unloaded while in use: freed when their last row ends
        self._free = list(range(num_slots - 1, -1, -1))  # lowest first: keeps slots in use compact

    def acquire(self, adapter: LoraAdapter, keep: set[str] = frozenset()) -> int | None:
        """Pin `adapter` in a slot for one more running row; None when every slot is pinned. A slot to
        recycle is taken from adapters not in `keep` (wanted by waiting requests) first."""
        entry = self._slot_of.get(adapter.adapter_id)
        if entry is not None and entry[1] is adapter:
            slot = entry[0]
            self.events.cache("device", "hit")
        else:
            if entry is not None:  # an older load of this id: no new rows on it
                self.retire(adapter.adapter_id)
            self.events.cache("device", "miss")
            slot = self._take_slot(keep)
            if slot is None:
                return None
            self._layers.install(slot, adapter.to(self._device))
            self._slot_of[adapter.adapter_id] = (slot, adapter)
        self._slot_of.move_to_end(adapter.adapter_id)
        self._users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if not self._users[slot] and slot in self._retired:
            self._retired.discard(slot)
            self._empty(slot)

    def retire(self, adapter_id: str) -> None:
        """Take an adapter out of the table (unload): its slot is freed once no row uses it."""
        entry = self._slot_of.pop(adapter_id, None)
        if entry is None:
            return
        slot = entry[0]
        if self._users[slot]:
            self._retired.add(slot)
        else:
            self._empty(slot)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def residency(self) -> list[tuple[str, bool]]:
        """(adapter id, pinned by a running row) for each adapter in a slot, least recently used first."""
        return [(adapter_id, self._users[slot] > 0) for adapter_id, (slot, _) in self._slot_of.items()]

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self._slot_of

    def has_room_for(self, adapter: LoraAdapter) -> bool:
        """Whether `acquire` would succeed now (the adapter is resident, or a slot can be had)."""
        entry = self._slot_of.get(adapter.adapter_id)
        if entry is not None and entry[1] is adapter:
            return True
        return bool(self._free) or any(not self._users[slot] for slot, _ in self._slot_of.values())

    def _take_slot(self, keep: set[str]) -> int | None:
        if self._free:
            return self._free.pop()
        idle = [adapter_id for adapter_id, (slot, _) in self._slot_of.items() if not self._users[slot]]  # LRU first
        victim = next((a for a in idle if a not in keep), idle[0] if idle else None)
        if victim is None:
            return None
        slot = self._slot_of.pop(victim)[0]
        self._layers.install(slot, None)
        self.events.cache("device", "eviction")
        return slot

    def _empty(self, slot: int) -> None:
        self._layers.install(slot, None)
        self._free.append(slot)
        self._free.sort(reverse=True)
