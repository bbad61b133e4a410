"""A stand-in for the endpoint picker (EPP), for the routing benchmark only: not part of the product.

In a cluster the llm-d router's EPP (docker/kserve/inference-pool.yaml, docs/scale-out.md) picks the
replica for each request. This module does what its default profile does, in Python, so that
bench.scale_out.routing can route real local tritonservers the same way without a cluster. Each
piece follows llm-d-router's source as read on its main branch in 2026 (the deployment pins v0.10.0;
`pkg/epp/framework/plugins/...`, which took them from gateway-api-inference-extension's
`pkg/epp/scheduling/framework/plugins/...`, where the scorers read the same):

Reading a replica (`datalayer/extractor/metrics`, the `core-metrics-extractor`): the page is parsed
as Prometheus text; a metric spec `name{label=value}` selects the series whose labels include
those. For the queue, running and KV specs it takes the first matching series (the newest by
timestamp, and our page has none); for the LoRA spec (`loraspec.go`) the series with the largest
value, which is the time its label set took effect. From that series: `running_lora_adapters` ->
active adapters, `waiting_lora_adapters` -> waiting adapters (comma-separated, blanks dropped),
`max_lora` -> the most adapters the replica runs at once. The specs and weights are read from
docker/kserve/inference-pool.yaml itself, so the harness routes by what is deployed.

The scorers (`scheduling/scorer/...`), each a score in [0, 1] per replica:
- queue-scorer (`queuedepth/queue.go`): with q the waiting count of each replica,
  (max q - q) / (max q - min q); 1 for every replica when all queues are equal.
- kv-cache-utilization-scorer (`kvcacheutilization/kvcache_utilization.go`): 1 - KV usage.
- lora-affinity-scorer (`loraaffinity/lora_affinity.go`), for the request's adapter A:
  1.0 if A is active (running) there; else 0.8 if len(active) + len(waiting) < max_lora (room for
  one more adapter); else 0.6 if A is waiting there; else 0.
A replica's score is the sum of weight x score over the profile's scorers; the max-score-picker
takes the highest, a tie going to a random one (upstream shuffles then sorts stably; here a seeded
RNG picks among the tied, so runs repeat).

Round-robin is the baseline: the replicas in turn, whatever their metrics say.
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common.paths import REPO

INFERENCE_POOL = REPO / "docker" / "kserve" / "inference-pool.yaml"
ENGINE_TYPE = "multilora-triton"  # the engineConfigs entry our predictor pods select
SCORERS = ("queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer")
SPEC = re.compile(r'^\s*([A-Za-z_:][\w:]*)\s*(?:\{(.*)\})?\s*$')


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """`name{label=value,...}`: the series of `name` whose labels include these."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        """The EPP's spec syntax: a PromQL instant selector, label values quoted or not."""
        match = SPEC.match(text)
        if not match:
            raise ValueError(f"not a metric spec: {text!r}")
        labels = []
        for part in filter(None, (p.strip() for p in (match.group(2) or "").split(","))):
            key, _, value = part.partition("=")
            labels.append((key.strip(), value.strip().strip('"')))
        return cls(match.group(1), tuple(labels))

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.labels)


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the EPP is configured with: the metric specs of our engine type and the scorers' weights."""

    queued: MetricSpec
    running: MetricSpec
    kv_usage: MetricSpec
    lora: MetricSpec
    weights: dict[str, float]


def load_profile(path: Path = INFERENCE_POOL) -> Profile:
    """The `multilora-triton` engine mapping and the default scheduling profile's scorer weights
    (a plugin without `weight` weighs 1, as upstream) from the EPP ConfigMap in `path`."""
    config_map = next(doc for doc in yaml.safe_load_all(path.read_text())
                      if doc and doc.get("kind") == "ConfigMap" and "epp-config.yaml" in doc.get("data", {}))
    config = yaml.safe_load(config_map["data"]["epp-config.yaml"])
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    engine = next(e for e in extractor["parameters"]["engineConfigs"] if e["name"] == ENGINE_TYPE)
    types = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    weights = {types[ref["pluginRef"]]: float(ref.get("weight", 1)) for ref in profile["plugins"]
               if types[ref["pluginRef"]] in SCORERS}
    return Profile(MetricSpec.parse(engine["queuedRequestsSpec"]), MetricSpec.parse(engine["runningRequestsSpec"]),
                   MetricSpec.parse(engine["kvUsageSpec"]), MetricSpec.parse(engine["loraSpec"]), weights)


@dataclasses.dataclass(frozen=True)
class ReplicaMetrics:
    """One replica as the EPP sees it after a scrape (upstream's `Metrics` fields that the scorers read)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    active: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int = 0


def _adapters(csv: str) -> frozenset[str]:
    return frozenset(name.strip() for name in csv.split(",") if name.strip())


def extract(page: str, profile: Profile, previous: ReplicaMetrics = ReplicaMetrics()) -> ReplicaMetrics:
    """A metrics page (Prometheus text) read as the core-metrics-extractor reads it. What the page
    lacks (no matching series) keeps its value from `previous`, the replica's last reading, as the
    extractor updates a clone of the last one."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def first(spec: MetricSpec, default: float) -> float:
        found = [value for labels, value in samples.get(spec.name, []) if spec.matches(labels)]
        return found[0] if found else default

    updated = dataclasses.replace(previous, waiting=int(first(profile.queued, previous.waiting)),
                                  running=int(first(profile.running, previous.running)),
                                  kv_usage=first(profile.kv_usage, previous.kv_usage))
    lora = [(value, labels) for labels, value in samples.get(profile.lora.name, []) if profile.lora.matches(labels)]
    if not lora:
        return updated
    info = max(lora, key=lambda item: item[0])[1]
    max_lora = info.get("max_lora", "")
    return dataclasses.replace(updated, active=_adapters(info.get("running_lora_adapters", "")),
                               waiting_adapters=_adapters(info.get("waiting_lora_adapters", "")),
                               max_lora=int(max_lora) if max_lora else previous.max_lora)


def queue_scores(replicas: Sequence[ReplicaMetrics]) -> list[float]:
    low, high = min(r.waiting for r in replicas), max(r.waiting for r in replicas)
    return [1.0 if high == low else (high - r.waiting) / (high - low) for r in replicas]


def kv_cache_scores(replicas: Sequence[ReplicaMetrics]) -> list[float]:
    return [1.0 - r.kv_usage for r in replicas]


def lora_affinity_scores(replicas: Sequence[ReplicaMetrics], adapter: str) -> list[float]:
    def score(r: ReplicaMetrics) -> float:
        if adapter in r.active:
            return 1.0
        if len(r.active) + len(r.waiting_adapters) < r.max_lora:
            return 0.8
        return 0.6 if adapter in r.waiting_adapters else 0.0
    return [score(r) for r in replicas]


def weighted_scores(replicas: Sequence[ReplicaMetrics], adapter: str, weights: dict[str, float]) -> list[float]:
    """Sum over the profile's scorers of weight x score, per replica."""
    per_scorer = {"queue-scorer": queue_scores(replicas), "kv-cache-utilization-scorer": kv_cache_scores(replicas),
                  "lora-affinity-scorer": lora_affinity_scores(replicas, adapter)}
    return [sum(weight * per_scorer[name][i] for name, weight in weights.items()) for i in range(len(replicas))]


class EndpointPicker:
    """The default profile: weighted scorers, then the max-score-picker."""

    name = "EPP scorers"

    def __init__(self, profile: Profile, seed: int) -> None:
        self.profile = profile
        self.rng = random.Random(seed)

    def choose(self, replicas: Sequence[ReplicaMetrics], adapter: str) -> int:
        scores = weighted_scores(replicas, adapter, self.profile.weights)
        best = max(scores)
        return self.rng.choice([i for i, s in enumerate(scores) if s == best])


class RoundRobin:
    """The baseline: each replica in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self.next = 0

    def choose(self, replicas: Sequence[ReplicaMetrics], adapter: str) -> int:
        chosen = self.next % len(replicas)
        self.next += 1
        return chosen
