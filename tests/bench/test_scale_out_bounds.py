"""bench.scale_out.bounds: the LRU model the routing benchmark compares its measured loads with."""
from __future__ import annotations

from bench.scale_out.bounds import lru_misses, round_robin_and_sticky


def test_lru_misses_count_first_uses_and_evictions():
    one_replica = lambda n, a: 0  # noqa: E731
    assert lru_misses(["a", "b", "a", "c", "a", "b"], one_replica, 1, 2) == 4  # a b (a hit) c: b out (a hit) b
    assert lru_misses(["a", "a", "b", "b"], lambda n, a: n % 2, 2, 1) == 4, "each replica sees each adapter cold"


def test_a_sticky_router_loads_each_adapter_once_where_round_robin_thrashes():
    sequence = ["a", "b"] * 15  # "a" and "b" hash to different replicas of three (crc32 % 3: 0 and 2)
    assert round_robin_and_sticky(sequence, 3, 1) == (30, 2), "one slot each: round-robin alternates a and b on it"
    assert round_robin_and_sticky(sequence, 3, 2) == (6, 2), "room for both: round-robin loads each once per replica"
