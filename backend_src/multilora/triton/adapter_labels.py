"""Which adapter ids get a label value of their own on the per-adapter counters.

An adapter id in a request is only a name a client chose. If every id became a label value, a
client sending random ids would add series (and memory) without bound: 5 unknown ids made 10 new
series of lora_requests_total and lora_request_errors_total. So an id gets its own series only once
this server has loaded it; requests for any other id (unknown, misspelt, refused, failed to load)
count under UNKNOWN. Loaded ids are bounded by the adapters the operator provides, and once more
here: of the ids no longer held in memory, only the `capacity` most recently used keep their
series; the caller removes the series of those dropped (a later load gives the id a new series,
which Prometheus reads as a counter reset).

Not thread-safe: the caller serializes (multilora.triton.metrics holds one lock for all calls).
"""
from __future__ import annotations

from collections import OrderedDict

BASE_MODEL = "__base__"  # requests without an adapter
UNKNOWN = "__unknown__"  # requests for an id this server never loaded


class AdapterLabels:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()  # labelled ids, least recently used first
        self._held: frozenset[str] = frozenset()  # in memory now: never dropped

    def label(self, adapter_id: str | None) -> str:
        """The label value a request for `adapter_id` counts under."""
        if not adapter_id:
            return BASE_MODEL
        if adapter_id not in self._ids:
            return UNKNOWN
        self._ids.move_to_end(adapter_id)
        return adapter_id

    def loaded(self, adapter_id: str) -> list[str]:
        """An adapter loaded: it gets its own label. Returns the ids whose labels were dropped."""
        self._ids[adapter_id] = None
        self._ids.move_to_end(adapter_id)
        return self._prune()

    def held(self, adapter_ids: frozenset[str]) -> list[str]:
        """The ids in memory now (host tier and device slots). Returns the ids whose labels were dropped."""
        self._held = adapter_ids
        return self._prune()

    def _prune(self) -> list[str]:
        dropped = []
        idle = [a for a in self._ids if a not in self._held]  # least recently used first
        for adapter_id in idle[:max(0, len(idle) - self.capacity)]:
            del self._ids[adapter_id]
            dropped.append(adapter_id)
        return dropped
