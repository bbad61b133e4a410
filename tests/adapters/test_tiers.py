"""Adapter tiers: loads off the engine thread (one per adapter however many ask, stall-proof,
limited), the host LRU cache, and device slots pinned by running rows."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from transformers import AutoConfig

from multilora.adapters import files as adapter_files
from multilora.adapters.loader import AdapterLoader
from multilora.adapters.slots import LoraSlots
from multilora.adapters.store import AdapterPolicy, AdapterStore
from multilora.errors import AdapterLoadError, AdapterNotFoundError
from multilora.events import EngineEvents
from multilora.lora.backends.torch import TorchBackend
from multilora.lora.layers import LoraContext, LoraLayers
from multilora.lora.weights import LoraWeightTable
from multilora.models.families import lora_target_shapes


class Recorder(EngineEvents):
    def __init__(self):
        self.loads: list[str] = []
        self.cache_events: list[tuple[str, str]] = []

    def loaded(self, adapter_id, seconds, nbytes):
        self.loads.append(adapter_id)

    def cache(self, tier, event):
        self.cache_events.append((tier, event))


@pytest.fixture
def adapters(demo_dir, tmp_path):
    folder = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", folder)
    for i in range(3):
        shutil.copytree(folder / "sql", folder / f"copy{i}")
    return folder


def make_store(demo_dir, adapters, events=None, **options):
    config = AutoConfig.from_pretrained(demo_dir / "base")
    policy = AdapterPolicy(max_rank=64, max_bytes=2**30, allowed=None, base_model_name="base")
    settings = dict(host_capacity=3, load_timeout_s=30.0)
    settings.update(options)
    return AdapterStore(str(adapters), targets=lora_target_shapes(config), num_layers=config.num_hidden_layers,
                        policy=policy, dtype=torch.float32, events=events or Recorder(), **settings)


def wait_loaded(store, future, timeout=30, protected=frozenset()):
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        store.poll(protected)
        time.sleep(0.005)
    store.poll(protected)
    return future.result(timeout=0)


def make_slots(demo_dir, num_slots=2):
    config = AutoConfig.from_pretrained(demo_dir / "base")
    shapes = lora_target_shapes(config)
    tables = [{name: LoraWeightTable(s.h_in, s.h_out, num_slots) for name, s in shapes.items()}
              for _ in range(config.num_hidden_layers)]
    return LoraSlots(LoraLayers(LoraContext(TorchBackend()), tables), num_slots, torch.device("cpu")), tables


def test_many_requests_for_one_cold_adapter_load_it_once(demo_dir, adapters):
    events = Recorder()
    store = make_store(demo_dir, adapters, events)
    futures = [store.request("chat") for _ in range(5)]
    assert len({id(f) for f in futures}) == 1
    adapter = wait_loaded(store, futures[0])
    assert events.loads == ["chat"] and store.listing()["host"] == ["chat"]
    assert store.request("chat").result(timeout=0) is adapter and ("host", "hit") in events.cache_events


def test_unknown_and_broken_adapters_fail_through_their_future(demo_dir, adapters):
    store = make_store(demo_dir, adapters)
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        wait_loaded(store, store.request("nope"))
    (adapters / "chat" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError, match="truncated"):
        wait_loaded(store, store.request("chat"))
    assert store.listing()["host"] == []


def test_host_cache_is_lru_and_keeps_protected_adapters(demo_dir, adapters):
    events = Recorder()
    store = make_store(demo_dir, adapters, events)
    for adapter_id in ("copy0", "copy1", "copy2", "sql", "chat"):
        wait_loaded(store, store.request(adapter_id), protected={"copy0"})
    host = store.listing()["host"]
    assert len(host) == 3 and "copy0" in host and "copy1" not in host and "copy2" not in host
    assert events.cache_events.count(("host", "eviction")) == 2


def test_device_slots_are_pinned_while_used_then_recycled(demo_dir, adapters):
    store = make_store(demo_dir, adapters)
    slots, tables = make_slots(demo_dir)
    a, b, c = (wait_loaded(store, store.request(x)) for x in ("sql", "chat", "summarize"))
    slot_a, slot_b = slots.acquire(a), slots.acquire(b)
    assert {slot_a, slot_b} == {0, 1}
    assert slots.acquire(c) is None and not slots.has_room_for(c)  # both slots have running rows
    slots.release(slot_a)
    slot_c = slots.acquire(c)
    assert slot_c == slot_a and slots.resident() == ["chat", "summarize"]
    # the slot now holds summarize's weights (attention only) and nothing of sql's
    assert tables[0]["o_proj"].a[slot_c] is not None and tables[0]["gate_proj"].a[slot_c] is None
    torch.testing.assert_close(tables[1]["q_proj"].a[slot_c], c.weights[(1, "q_proj")][0])


def test_after_unload_new_requests_read_the_files_again(demo_dir, adapters):
    """Issue 10 item 5: files replaced under a live adapter, then `unload`: every later request gets
    the new weights, also while rows still run on the old ones (whose slot stays theirs)."""
    store = make_store(demo_dir, adapters)
    slots, tables = make_slots(demo_dir)
    old = wait_loaded(store, store.request("sql"))
    old_slot = slots.acquire(old)  # a running row pins the old weights
    shutil.copy(adapters / "copy0" / "adapter_config.json", adapters / "sql" / "adapter_config.json")
    shutil.copy(adapters / "chat" / "adapter_model.safetensors", adapters / "sql" / "adapter_model.safetensors")
    shutil.copy(adapters / "chat" / "adapter_config.json", adapters / "sql" / "adapter_config.json")
    assert store.unload("sql") is True
    slots.retire("sql")
    new = wait_loaded(store, store.request("sql"))
    assert new is not old and (0, "down_proj") in new.weights and (0, "down_proj") not in old.weights
    new_slot = slots.acquire(new)
    assert new_slot != old_slot
    assert tables[0]["down_proj"].a[new_slot] is not None and tables[0]["down_proj"].a[old_slot] is None
    slots.release(old_slot)  # the old row ends: its slot is freed, not reused for 'sql'
    assert slots.resident() == ["sql"] and slots.acquire(new) == new_slot
    assert tables[0]["q_proj"].a[old_slot] is None


def test_a_stalled_read_times_out_on_time_and_blocks_nothing_else(demo_dir, adapters, monkeypatch):
    """Issue 10 item 2: a read that hangs fails only its adapter's load, at the timeout."""
    release = threading.Event()
    real_read = adapter_files.read_file

    def read(adapter_id, path, root, max_bytes):
        if adapter_id == "chat" and path.name == adapter_files.WEIGHTS_FILE:
            release.wait(60)  # hung storage: the thread waits in the read
        return real_read(adapter_id, path, root, max_bytes)

    monkeypatch.setattr(adapter_files, "read_file", read)
    store = make_store(demo_dir, adapters, load_timeout_s=0.5, max_loads=1)
    started = time.monotonic()
    stalled = store.request("chat")
    other = store.request("sql")  # queued behind the one allowed load until the stall is abandoned
    with pytest.raises(AdapterLoadError, match="did not load within adapter_load_timeout_s \\(0.5 s\\)"):
        wait_loaded(store, stalled)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert wait_loaded(store, other).adapter_id == "sql"
    assert store.loader.blocked == 1 and store.listing()["loading"] == []
    release.set()


def test_loads_are_rate_limited():
    started = []
    loader = AdapterLoader(lambda adapter_id: started.append(adapter_id), max_concurrent=2, per_second=10)
    loads = [loader.submit(f"a{i}") for i in range(4)]
    time.sleep(0.05)
    assert len(started) == 2  # the burst: as many as may run at once
    deadline = time.monotonic() + 5
    while len(started) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
        loader.dispatch()
    assert sorted(started) == ["a0", "a1", "a2", "a3"] and all(load.future.done() for load in loads)


def test_a_slot_to_recycle_comes_from_an_adapter_no_one_is_waiting_for(demo_dir, adapters):
    store = make_store(demo_dir, adapters)
    slots, _ = make_slots(demo_dir)
    sql, chat, summarize = (wait_loaded(store, store.request(x)) for x in ("sql", "chat", "summarize"))
    for adapter in (sql, chat):  # sql is the least recently used of the two idle slots
        slots.release(slots.acquire(adapter))
    slots.acquire(summarize, keep={"sql"})
    assert slots.resident() == ["sql", "summarize"]  # chat went, though sql was older: sql is wanted
    slots.release(slots.acquire(chat))  # no preference: least recently used (sql) goes
    assert slots.resident() == ["summarize", "chat"]


def test_auto_slot_count(demo_dir, monkeypatch):
    from multilora.adapters.slots import slot_count
    from multilora.config import EngineConfig

    config = AutoConfig.from_pretrained(demo_dir / "base")
    shapes, layers = lora_target_shapes(config), config.num_hidden_layers
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = EngineConfig(base_model="x", max_num_seqs=24, max_cpu_loras=64)
    assert slot_count(auto, cpu, shapes, layers, torch.float32) == 24  # one per running row
    assert slot_count(EngineConfig(base_model="x", max_num_seqs=24, max_cpu_loras=16), cpu, shapes, layers,
                      torch.float32) == 16
    assert slot_count(EngineConfig(base_model="x", max_loras=5), cpu, shapes, layers, torch.float32) == 5
    per_slot = layers * sum(s.h_in + s.h_out for s in shapes.values()) * 64 * 2  # rank 64, bf16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_slot * 20 + 7, 10 * per_slot * 20))
    assert slot_count(auto, cuda, shapes, layers, torch.bfloat16) == 10  # half of what is free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_slot * 1000, per_slot * 1000))
    assert slot_count(auto, cuda, shapes, layers, torch.bfloat16) == 64  # at most max_cpu_loras


def test_stalled_loads_give_their_places_up_to_a_bound_of_threads():
    """Issue 23 item 4: a load running past stall_s no longer holds one of max_concurrent places, but
    at most max_stalled such threads are excused: threads never exceed the sum of the two."""
    release = threading.Event()
    started = []

    def load(adapter_id):
        started.append(adapter_id)
        release.wait(30)

    loader = AdapterLoader(load, max_concurrent=1, per_second=0, stall_s=0.2, max_stalled=2)
    loads = [loader.submit(f"a{i}") for i in range(5)]
    assert started == ["a0"]
    deadline = time.monotonic() + 5
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        loader.dispatch()
    time.sleep(0.5)
    loader.dispatch()
    assert started == ["a0", "a1", "a2"] and loader.threads == 3  # 1 place + 2 stalled, no more
    release.set()
    deadline = time.monotonic() + 5
    while not all(load.future.done() for load in loads) and time.monotonic() < deadline:
        time.sleep(0.02)
        loader.dispatch()
    assert sorted(started) == [f"a{i}" for i in range(5)]


def test_an_adapter_whose_abandoned_load_still_hangs_fails_at_once(demo_dir, adapters, monkeypatch):
    """Issue 23 item 4: a new request for it must not park one more thread on the same hung files."""
    release = threading.Event()
    real_read = adapter_files.read_file

    def read(adapter_id, path, root, max_bytes):
        if adapter_id == "chat" and path.name == adapter_files.WEIGHTS_FILE:
            release.wait(30)
        return real_read(adapter_id, path, root, max_bytes)

    monkeypatch.setattr(adapter_files, "read_file", read)
    store = make_store(demo_dir, adapters, load_timeout_s=0.3)
    with pytest.raises(AdapterLoadError, match="adapter_load_timeout_s \\(0.3 s\\)"):
        wait_loaded(store, store.request("chat"))
    with pytest.raises(AdapterLoadError, match="previous load has waited on its files .* tried again once that read"):
        store.request("chat")
    assert store.loader.threads == 1
    release.set()
    deadline = time.monotonic() + 5
    while store.loader.blocked and time.monotonic() < deadline:
        time.sleep(0.02)
    assert wait_loaded(store, store.request("chat")).adapter_id == "chat"


def test_a_cached_adapter_whose_files_change_is_read_again(demo_dir, adapters):
    """Issue 23 item 7: the host tier looks at a cached adapter's files (once per interval) when a
    request arrives: unchanged, the cached copy; replaced, a fresh read; deleted, unknown."""
    events = Recorder()
    store = make_store(demo_dir, adapters, events, check_interval_s=0.2)
    sql = wait_loaded(store, store.request("sql"))
    assert store.request("sql").result(timeout=0) is sql  # looked at less than 0.2 s ago: no look
    time.sleep(0.3)
    assert wait_loaded(store, store.request("sql")) is sql and events.loads == ["sql"]  # looked: unchanged
    shutil.copy(adapters / "chat" / "adapter_model.safetensors", adapters / "sql" / "adapter_model.safetensors")
    time.sleep(0.3)
    changed = []
    future = store.request("sql")
    deadline = time.monotonic() + 30
    while not future.done() and time.monotonic() < deadline:
        changed += store.poll()
        time.sleep(0.005)
    changed += store.poll()
    new = future.result(timeout=0)
    assert changed == ["sql"] and new is not sql and events.loads == ["sql", "sql"]
    assert (0, "down_proj") in new.weights and (0, "down_proj") not in sql.weights
    shutil.rmtree(adapters / "sql")
    time.sleep(0.3)
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'sql'"):
        wait_loaded(store, store.request("sql"))
    assert "sql" not in store.listing()["host"] and "sql" not in store.listing()["disk"]


def test_a_look_that_hangs_serves_the_copy_in_memory(demo_dir, adapters, monkeypatch):
    """A stat on hung storage blocks too: after WAIT_S the request gets the cached weights."""
    from multilora.adapters import freshness

    store = make_store(demo_dir, adapters, check_interval_s=0.1)
    sql = wait_loaded(store, store.request("sql"))
    release = threading.Event()
    monkeypatch.setattr(freshness, "files_identity", lambda folder: release.wait(30))
    time.sleep(0.2)
    started = time.monotonic()
    assert wait_loaded(store, store.request("sql")) is sql
    assert freshness.WAIT_S <= time.monotonic() - started < freshness.WAIT_S + 2
    assert store.request("sql").result(timeout=0) is sql  # no second look while the first hangs
    release.set()
