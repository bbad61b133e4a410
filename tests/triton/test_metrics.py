"""The metrics the Triton glue publishes, through a stand-in for pb_utils (fake_triton.FakeTriton)
that behaves as the Python backend of tritonserver 2.51 does; tests/e2e/test_scale_out_metrics.py
checks the real one."""
from __future__ import annotations

import random
import string

import pytest

from fake_triton import FakeTriton
from multilora.events import EngineSnapshot
from multilora.triton.adapter_labels import BASE_MODEL, UNKNOWN, AdapterLabels
from multilora.triton.metrics import LoraMetrics


def snapshot(running=(), waiting=(), *, num_running=None, num_waiting=None, device=(), host=(), kv=(0, 100),
             slots=4) -> EngineSnapshot:
    return EngineSnapshot(num_running if num_running is not None else len(running),
                          num_waiting if num_waiting is not None else len(waiting), kv[0], kv[1],
                          tuple(running), tuple(waiting), slots, 8, tuple(device), tuple(host))


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def only(samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


@pytest.fixture
def triton() -> FakeTriton:
    return FakeTriton()


def test_the_protocol_gauges_follow_the_snapshot(triton):
    metrics = LoraMetrics(triton, max_cpu_loras=8)
    samples = triton.samples()
    assert value(samples, "lora_scheduler_state", state="running") == 0, "zero before the engine exists"
    metrics.state(snapshot(["a", "b", "c"], ["d", "e"], kv=(30, 120), device=[("a", True), ("b", True), ("c", True)],
                           host=[("a", True), ("b", True), ("c", True), ("x", False)]))
    samples = triton.samples()
    assert value(samples, "lora_scheduler_state", state="running") == 3
    assert value(samples, "lora_scheduler_state", state="waiting") == 2
    assert value(samples, "lora_kv_cache_usage") == 0.25
    (info,) = only(samples, "lora_requests_info")
    assert info == {"running_lora_adapters": "a,b,c", "waiting_lora_adapters": "d,e", "max_lora": "4"}
    assert value(samples, "lora_adapter_residency", adapter="a", tier="device", pinned="true") == 1
    assert value(samples, "lora_adapter_residency", adapter="x", tier="host", pinned="false") == 1
    assert len(only(samples, "lora_adapter_residency")) == 7
    assert value(samples, "lora_adapter_capacity", tier="device") == 4
    assert value(samples, "lora_adapter_capacity", tier="host") == 8
    assert value(samples, "lora_adapters_resident", tier="host") == 4
    assert value(samples, "lora_adapters_pinned", tier="host") == 3
    assert value(samples, "lora_adapters_pinned", tier="device") == 3


def test_stale_series_leave_the_page(triton):
    metrics = LoraMetrics(triton, max_cpu_loras=8)
    metrics.state(snapshot(["a"], ["b"], device=[("a", True)], host=[("a", True), ("b", False)]))
    first = triton.samples()
    (info,) = only(first, "lora_requests_info")
    metrics.state(snapshot(["b"], device=[("b", True)], host=[("b", True)]))
    second = triton.samples()
    (info2,) = only(second, "lora_requests_info")
    assert info2 == {"running_lora_adapters": "b", "waiting_lora_adapters": "", "max_lora": "4"}
    assert value(second, "lora_requests_info", **info2) >= value(first, "lora_requests_info", **info)
    assert only(second, "lora_adapter_residency") == [{"adapter": "b", "tier": "device", "pinned": "true"},
                                                       {"adapter": "b", "tier": "host", "pinned": "true"}]
    metrics.state(snapshot(host=[("b", False)]))  # all done: the lists empty, b stays in host memory
    third = triton.samples()
    assert only(third, "lora_requests_info") == [{"running_lora_adapters": "", "waiting_lora_adapters": "",
                                                  "max_lora": "4"}]
    assert only(third, "lora_adapter_residency") == [{"adapter": "b", "tier": "host", "pinned": "false"}]
    assert value(third, "lora_scheduler_state", state="running") == 0


def test_an_unchanged_state_costs_no_calls_and_churn_leaves_no_families(triton):
    metrics = LoraMetrics(triton, max_cpu_loras=8)
    state = snapshot(["a"], device=[("a", True)], host=[("a", True)])
    metrics.state(state)
    calls = triton.calls
    metrics.state(state)
    assert triton.calls == calls
    families = triton.families_alive
    for i in range(200):  # adapters come and go: every series made for them is gone with them
        metrics.state(snapshot([f"x{i}"], device=[(f"x{i}", True)], host=[(f"x{i}", True)]))
    metrics.state(state)
    assert triton.families_alive == families
    assert len(only(triton.samples(), "lora_adapter_residency")) == 2


def test_unknown_adapter_ids_add_no_series(triton):
    metrics = LoraMetrics(triton, max_cpu_loras=8)
    metrics.loaded("sql", 0.1, 1000)
    metrics.request_finished("sql", 5, False)
    metrics.request_finished(None, 3, False)
    metrics.request_finished("nope", 0, True)
    before = triton.samples()
    rng = random.Random(0)
    for _ in range(10_000):
        metrics.request_finished("".join(rng.choices(string.ascii_lowercase, k=12)), 0, True)
    after = triton.samples()
    assert after.keys() == before.keys()
    assert value(after, "lora_requests_total", adapter=UNKNOWN) == 10_001
    assert value(after, "lora_request_errors_total", adapter=UNKNOWN) == 10_001
    assert value(after, "lora_requests_total", adapter="sql") == 1
    assert value(after, "lora_generated_tokens_total", adapter="sql") == 5
    assert value(after, "lora_requests_total", adapter=BASE_MODEL) == 1


def test_labels_of_adapters_no_longer_held_are_bounded(triton):
    metrics = LoraMetrics(triton, max_cpu_loras=2)
    metrics.state(snapshot(host=[("a", False)]))  # a is held: it keeps its series whatever its age
    for name in ("a", "b", "c", "d"):
        metrics.loaded(name, 0.1, 1000)
        metrics.request_finished(name, 1, False)
    labelled = {labels["adapter"] for labels in only(triton.samples(), "lora_requests_total")}
    assert labelled == {"a", "c", "d"}, "held, plus the 2 most recently used of the others"
    metrics.request_finished("b", 1, False)
    assert {labels["adapter"] for labels in only(triton.samples(), "lora_requests_total")} == {"a", "c", "d", UNKNOWN}


def test_adapter_labels_alone():
    labels = AdapterLabels(capacity=1)
    assert labels.label(None) == BASE_MODEL and labels.label("a") == UNKNOWN
    assert labels.loaded("a") == [] and labels.label("a") == "a"
    assert labels.held(frozenset({"a"})) == []
    assert labels.loaded("b") == [] and labels.loaded("c") == ["b"]  # a is held; of b and c one stays
    assert labels.held(frozenset()) == ["a"]  # a was used less recently than c
    assert labels.label("c") == "c" and labels.label("a") == labels.label("b") == UNKNOWN
