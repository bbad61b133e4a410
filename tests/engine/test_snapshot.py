"""The state snapshot the engine reports after each step, for the metrics a load balancer scores."""
from __future__ import annotations

from engine_kit import Recorder, req
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.events import EngineEvents, EngineSnapshot


class Snapshots(EngineEvents):
    def __init__(self) -> None:
        self.taken: list[EngineSnapshot] = []

    def state(self, snapshot: EngineSnapshot) -> None:
        self.taken.append(snapshot)


def test_running_and_waiting_adapters_counts_kv_and_residency(demo_dir):
    events = Snapshots()
    engine = LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"),
                                    kv_cache_memory="16MiB", max_num_seqs=2, max_loras="2"), events)
    (idle,) = events.taken  # reported once built, before any request
    assert (idle.running, idle.waiting, idle.kv_blocks_used, idle.running_adapters) == (0, 0, 0, ())
    assert idle.kv_blocks_total == engine.kv_cache.num_blocks and idle.device_capacity == 2
    assert idle.host_capacity == 64 and idle.kv_cache_usage == 0.0
    rec = Recorder(engine)
    adapters = ["sql", "chat", "summarize"]
    for adapter in adapters:  # loaded first, so admission order (not load timing) decides who runs
        engine.manage("load", adapter)
    for i, adapter in enumerate(adapters):
        rec.add(req(str(i), adapter, max_tokens=6, ignore_eos=True))
    rec.add(req("base", None, max_tokens=6, ignore_eos=True))
    rec.run()
    assert all(a != b for a, b in zip(events.taken, events.taken[1:])), "reported only when it changed"
    busy = [s for s in events.taken if s.running == 2 and len(s.running_adapters) == 2]
    assert busy, "two adapters ran while the rest waited"
    for s in busy:
        assert s.waiting == 2 and s.kv_blocks_used > 0 and 0 < s.kv_cache_usage <= 1
        assert set(s.running_adapters) | set(s.waiting_adapters) == set(adapters)
        assert not set(s.running_adapters) & set(s.waiting_adapters)
        assert s.running_adapters == tuple(sorted(s.running_adapters))
        device = dict(s.device)
        assert all(device[a] for a in s.running_adapters), "the slots of running adapters are pinned"
        host = dict(s.host)
        assert all(host[a] for a in s.running_adapters), "their host copies hold slots: not evictable"
    last = events.taken[-1]
    assert (last.running, last.waiting, last.kv_blocks_used) == (0, 0, 0)
    assert last.running_adapters == last.waiting_adapters == ()
    assert len(last.device) == 2 and not any(pinned for _, pinned in last.device)
    assert dict(last.host) == {a: a in dict(last.device) for a in adapters}, "pinned: holds a device slot"
