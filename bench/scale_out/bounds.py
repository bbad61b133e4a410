"""What routing could save at most, from the request sequence alone: each replica's adapter tier as an
LRU cache of its capacity, requests taken one at a time (no concurrency, no pins). Round-robin
against a perfectly sticky router (every request for an adapter goes to the same replica) bounds
the ratio of loads any adapter-aware routing can reach on this traffic and these capacities."""
from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence


def lru_misses(sequence: Sequence[str], assign: Callable[[int, str], int], replicas: int, capacity: int) -> int:
    """Misses of per-replica LRU caches of `capacity` when request n for adapter a goes to assign(n, a)."""
    caches: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(replicas)]
    misses = 0
    for n, adapter in enumerate(sequence):
        cache = caches[assign(n, adapter)]
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        misses += 1
        cache[adapter] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return misses


def round_robin_and_sticky(sequence: Sequence[str], replicas: int, capacity: int) -> tuple[int, int]:
    """Loads under round-robin, and under a router that sends each adapter to one replica (by a hash
    of its id)."""
    return (lru_misses(sequence, lambda n, _: n % replicas, replicas, capacity),
            lru_misses(sequence, lambda _, adapter: zlib.crc32(adapter.encode()) % replicas, replicas, capacity))
