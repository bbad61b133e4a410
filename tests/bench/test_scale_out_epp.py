"""The routing benchmark's stand-in for the endpoint picker (bench.scale_out.epp) reads metrics pages
and picks replicas as the llm-d router's EPP does with docker/kserve/inference-pool.yaml. Pages
come from our metrics code (multilora.triton.metrics over fake_triton, the page tritonserver
writes) and are parsed with prometheus_client, as the benchmark's scrape parses the real ones."""
from __future__ import annotations

import pytest

from bench.scale_out.epp import (
    EndpointPicker,
    MetricSpec,
    ReplicaMetrics,
    RoundRobin,
    extract,
    kv_cache_scores,
    load_profile,
    lora_affinity_scores,
    queue_scores,
    weighted_scores,
)
from fake_triton import FakeTriton
from multilora.events import EngineSnapshot
from multilora.triton.metrics import LoraMetrics

PROFILE = load_profile()


def page(running=(), waiting=(), *, queued=None, kv_used=0, max_lora=4) -> str:
    """The metrics page of a replica whose engine runs requests of `running` adapters and has
    requests of `waiting` adapters queued (`queued` requests waiting, by default one per adapter)."""
    triton = FakeTriton()
    metrics = LoraMetrics(triton, max_cpu_loras=16)
    waiting_count = len(waiting) if queued is None else queued
    metrics.state(EngineSnapshot(len(running), waiting_count, kv_used, 100, tuple(sorted(running)),
                                 tuple(sorted(set(waiting) - set(running))), max_lora, 16,
                                 tuple((a, True) for a in sorted(running)), ()))
    return triton.page()


def test_the_profile_is_the_deployed_one():
    assert PROFILE.weights == {"lora-affinity-scorer": 2.0, "queue-scorer": 1.0, "kv-cache-utilization-scorer": 1.0}
    assert PROFILE.queued == MetricSpec("lora_scheduler_state", (("state", "waiting"),))
    assert PROFILE.running == MetricSpec("lora_scheduler_state", (("state", "running"),))
    assert PROFILE.kv_usage == MetricSpec("lora_kv_cache_usage")
    assert PROFILE.lora == MetricSpec("lora_requests_info")


def test_metric_specs_take_label_values_quoted_or_not():
    assert MetricSpec.parse('vllm:num_requests_waiting{model="m", state=x}') == MetricSpec(
        "vllm:num_requests_waiting", (("model", "m"), ("state", "x")))
    with pytest.raises(ValueError):
        MetricSpec.parse("{state=waiting}")


def test_a_replica_reads_as_the_extractor_reads_it():
    seen = extract(page(["a", "b"], ["c", "d", "a"], queued=3, kv_used=25), PROFILE)
    assert seen == ReplicaMetrics(waiting=3, running=2, kv_usage=0.25, active=frozenset({"a", "b"}),
                                  waiting_adapters=frozenset({"c", "d"}), max_lora=4)
    assert extract(page(), PROFILE) == ReplicaMetrics(max_lora=4), "idle: empty lists, the slots still known"


def test_the_newest_lora_info_series_wins_and_a_page_without_one_keeps_the_last():
    text = ('# TYPE lora_requests_info gauge\n'
            'lora_requests_info{max_lora="4",running_lora_adapters="new",waiting_lora_adapters=""} 200.0\n'
            'lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 100.0\n'
            '# TYPE lora_scheduler_state gauge\n'
            'lora_scheduler_state{state="running"} 1.0\nlora_scheduler_state{state="waiting"} 0.0\n'
            '# TYPE lora_kv_cache_usage gauge\nlora_kv_cache_usage 0.5\n')
    seen = extract(text, PROFILE)
    assert (seen.active, seen.waiting_adapters, seen.kv_usage) == (frozenset({"new"}), frozenset(), 0.5)
    without_info = text.split("# TYPE lora_scheduler_state")[1]
    later = extract("# TYPE lora_scheduler_state" + without_info.replace("0.5", "0.75"), PROFILE, seen)
    assert (later.active, later.max_lora, later.kv_usage) == (frozenset({"new"}), 4, 0.75)


def test_the_scorers_formulas():
    replicas = [extract(p, PROFILE) for p in (page(["a"], queued=0, kv_used=10),
                                              page(["b", "c", "d"], ["e"], queued=2, kv_used=40),
                                              page(["f", "g"], ["h", "i"], queued=4))]
    assert queue_scores(replicas) == [1.0, 0.5, 0.0]
    assert kv_cache_scores(replicas) == pytest.approx([0.9, 0.6, 1.0])
    assert lora_affinity_scores(replicas, "a") == [1.0, 0.0, 0.0], "running there; b and f/g are full (3+1, 2+2)"
    assert lora_affinity_scores(replicas, "e") == [0.8, 0.6, 0.0], "a slot free; queued there; no room"
    assert lora_affinity_scores(replicas, "z") == [0.8, 0.0, 0.0]
    assert queue_scores(replicas[:1] * 3) == [1.0, 1.0, 1.0], "equal queues: neutral"
    assert weighted_scores(replicas, "e", PROFILE.weights) == pytest.approx([2 * 0.8 + 1 + 0.9, 2 * 0.6 + 0.5 + 0.6,
                                                                             0 + 0 + 1.0])


def pick(pages: list[str], adapter: str, seed: int = 0) -> int:
    return EndpointPicker(PROFILE, seed).choose([extract(p, PROFILE) for p in pages], adapter)


def test_the_replica_running_the_adapter_wins_when_queues_are_level():
    assert pick([page(["x"]), page(["a", "y"]), page(["z"])], "a") == 1


def test_a_longer_queue_outweighs_affinity():
    # Replica 1 runs `a` but has the longest queue: 2 x 1.0 + 0 + 1 = 3.0 against 2 x 0.8 + 1 + 1 = 3.6.
    pages = [page(["x"]), page(["a"], ["q"], queued=2), page(["z"])]
    picks = {pick(pages, "a", seed) for seed in range(20)}
    assert picks == {0, 2}, "never the replica with the queue; the tie between the others goes either way"


def test_kv_pressure_outweighs_affinity_past_the_weight_gap():
    assert pick([page(["x"], kv_used=0), page(["a"], kv_used=50)], "a") == 0  # 3.6 > 2 + 1 + 0.5
    assert pick([page(["x"], kv_used=0), page(["a"], kv_used=30)], "a") == 1  # 3.6 < 2 + 1 + 0.7


def test_full_replicas_lose_to_the_one_where_the_adapter_is_queued():
    full = ["p", "q", "r", "s"]
    assert pick([page(full), page(full, ["b"], queued=1), page(full)], "b") == 1  # 2 x 0.6 + 0 + 1 > 0 + 1 + 1


def test_ties_are_broken_by_the_seeded_rng():
    pages = [page(), page(), page()]
    replicas = [extract(p, PROFILE) for p in pages]
    first, second = EndpointPicker(PROFILE, 7), EndpointPicker(PROFILE, 7)
    picks = [first.choose(replicas, "a") for _ in range(60)]
    assert picks == [second.choose(replicas, "a") for _ in range(60)], "same seed, same picks"
    assert set(picks) == {0, 1, 2}


def test_round_robin_ignores_the_metrics():
    policy = RoundRobin()
    replicas = [extract(page(["a"]), PROFILE), extract(page(), PROFILE), extract(page(), PROFILE)]
    assert [policy.choose(replicas, "a") for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
