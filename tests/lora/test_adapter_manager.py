"""Adapter tiers: one load per adapter however many ask, LRU host cache, pinned device slots."""
from __future__ import annotations

import shutil

import pytest
import torch

from multilora.events import EngineEvents
from multilora.lora.adapter_manager import AdapterManager, AdapterPolicy
from multilora.lora.ops import LoraWeightTable

SHAPES = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
          "gate_proj": (128, 344), "up_proj": (128, 344), "down_proj": (344, 128)}


class Recorder(EngineEvents):
    def __init__(self):
        self.loads: list[str] = []
        self.cache_events: list[tuple[str, str]] = []

    def loaded(self, adapter_id, seconds, nbytes):
        self.loads.append(adapter_id)

    def cache(self, tier, event):
        self.cache_events.append((tier, event))


@pytest.fixture
def manager(demo_dir, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", adapters)
    for i in range(3):
        shutil.copytree(adapters / "sql", adapters / f"copy{i}")
    tables = [{name: LoraWeightTable(h_in, h_out, 2) for name, (h_in, h_out) in SHAPES.items()} for _ in range(4)]
    events = Recorder()
    policy = AdapterPolicy(max_rank=64, max_bytes=2**30, allowed=None, base_model_name="base")
    made = AdapterManager(str(adapters), tables, SHAPES, policy, torch.float32, torch.device("cpu"),
                          max_loras=2, max_cpu_loras=3, events=events)
    yield made, events, tables
    made.shutdown()


def test_many_requests_for_one_cold_adapter_load_it_once(manager):
    made, events, _ = manager
    futures = [made.request("chat") for _ in range(5)]
    adapters = {id(f.result(timeout=30)) for f in futures}
    assert len(adapters) == 1 and events.loads == ["chat"]
    made.request("chat").result()
    assert events.loads == ["chat"] and ("host", "hit") in events.cache_events


def test_host_cache_is_lru_and_never_evicts_an_adapter_in_a_device_slot(manager):
    made, events, _ = manager
    pinned = made.request("copy0").result(timeout=30)
    assert made.acquire_slot(pinned) is not None
    for adapter_id in ("copy1", "copy2", "sql", "chat"):
        made.request(adapter_id).result(timeout=30)
    host = made.listing()["host"]
    assert len(host) == 3 and "copy0" in host and "copy1" not in host  # LRU out, pinned kept
    assert events.cache_events.count(("host", "eviction")) == 2


def test_device_slots_are_pinned_while_used_then_recycled(manager):
    made, _, tables = manager
    a, b, c = (made.request(x).result(timeout=30) for x in ("sql", "chat", "summarize"))
    slot_a, slot_b = made.acquire_slot(a), made.acquire_slot(b)
    assert {slot_a, slot_b} == {0, 1}
    assert made.acquire_slot(c) is None  # both slots have running rows
    made.release_slot("sql")
    slot_c = made.acquire_slot(c)
    assert slot_c == slot_a and made.listing()["device"] == ["chat", "summarize"]
    # the slot now holds summarize's weights (attention only) and nothing of sql's
    assert tables[0]["o_proj"].a[slot_c] is not None and tables[0]["gate_proj"].a[slot_c] is None
    torch.testing.assert_close(tables[1]["q_proj"].a[slot_c], c.weights[(1, "q_proj")][0])


def test_unload_frees_host_memory_and_the_slot_once_unused(manager):
    made, _, _ = manager
    adapter = made.request("sql").result(timeout=30)
    made.acquire_slot(adapter)
    assert made.unload("sql") is True
    assert "sql" not in made.listing()["host"] and "sql" not in made.listing()["device"]
    made.release_slot("sql")
    assert made.resident_counts() == {"host": 0, "device": 0}  # the slot is free again
    assert made.unload("never-loaded") is False
