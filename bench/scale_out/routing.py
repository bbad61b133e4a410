"""What adapter-aware routing buys over round-robin, measured on real local tritonservers.

    python -m bench.scale_out.routing            # full run, writes its section of docs/benchmarks.md
    python -m bench.scale_out.routing --quick    # fewer requests: checks that it works (prints only)

Three tritonservers (the `tiny` generated Llama, max_loras 4, max_cpu_loras 16) on loopback ports
share 200 generated adapters. One request sequence, Zipf(1.1) over the adapters, is sent with 16
requests in flight (a new one as each ends), streamed over gRPC, twice per repeat: routed by
round-robin, and by bench.scale_out.epp, a stand-in for the endpoint picker (EPP) that scores each
replica from its scraped metrics with the scorers and weights of docker/kserve/inference-pool.yaml.
The stand-in is part of this benchmark, not of the product: in a cluster the llm-d router does
this (docs/scale-out.md). No gateway: the client routes each request itself.

Each policy starts on fresh servers (cold caches), with one base-model request per replica first
so that the engines' first steps do not count. Reported per policy: adapter loads, counted by
the servers themselves (`lora_adapter_cache_events_total`: host-tier misses are reads from disk,
device-tier misses are adapters put into a device slot), time to first token p50/p99 (client
clock, from sending to the first streamed response) and output tokens/s. Floors (issue 21): the
EPP's routing cuts adapter loads >= 3x and TTFT p99 >= 1.5x against round-robin. Next to them,
bench.scale_out.bounds: the most any routing could cut loads by on this sequence and these cache
sizes (round-robin against a perfectly sticky router, each tier modelled as an LRU cache).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import tritonclient.grpc as grpcclient

from bench.common.machine import machine_description
from bench.common.models import ensure_scale_adapters, full_vocab_base, scale_adapter_ids
from bench.common.tritonserver import config_parameters, request_inputs, stream_all, write_repository
from bench.scale_out.bounds import round_robin_and_sticky
from bench.scale_out.epp import EndpointPicker, Profile, RoundRobin, load_profile, lora_affinity_scores
from bench.scale_out.replicas import Scraper, cache_events, replicas
from bench.scale_out.report import Outcome, print_summary, write_section
from multilora.config import EngineConfig

PROMPT = "SELECT name FROM orders WHERE"
ZIPF_S = 1.1


@dataclasses.dataclass(frozen=True)
class Setup:
    replicas: int = 3
    adapters: int = 200
    requests: int = 1000
    in_flight: int = 16
    max_tokens: int = 16
    repeats: int = 2
    scrape_ms: float = 50.0
    seed: int = 0
    max_loras: int = 4
    max_cpu_loras: int = 16


def zipf_sequence(ids: list[str], count: int, seed: int) -> list[str]:
    """`count` adapter ids drawn Zipf(1.1) by rank: the i-th id (from 1) has weight 1 / i^1.1."""
    rng = random.Random(seed)
    return rng.choices(ids, weights=[1 / (i + 1) ** ZIPF_S for i in range(len(ids))], k=count)


def drive(servers, scraper: Scraper, policy, adapters: list[str],
          setup: Setup) -> tuple[list[float], int, float, list[int], Counter[float]]:
    """Send `adapters` in order, `in_flight` at a time, each to the replica `policy` chooses from the
    latest scrape; returns the TTFT of each request, tokens generated, seconds, requests per replica
    and how many picks had each LoRA-affinity score (1: the adapter was running there)."""
    events: queue.Queue = queue.Queue()
    clients = []
    for server in servers:  # one stream per replica, every response into one queue
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
        clients.append(client)
    sent: dict[str, float] = {}
    ttft: dict[str, float] = {}
    per_replica = [0] * len(servers)
    affinity: Counter[float] = Counter()
    tokens = done = 0
    pending = iter(enumerate(adapters))

    def send() -> None:
        n, adapter = next(pending)
        seen = scraper.latest()
        chosen = policy.choose(seen, adapter)
        per_replica[chosen] += 1
        affinity[lora_affinity_scores(seen, adapter)[chosen]] += 1
        sent[str(n)] = time.perf_counter()
        clients[chosen].async_stream_infer("lora_llm", request_inputs(PROMPT, adapter, setup.max_tokens, True),
                                           request_id=str(n), enable_empty_final_response=False)

    started = time.perf_counter()
    for _ in range(min(setup.in_flight, len(adapters))):
        send()
    while done < len(adapters):
        now, result, error = events.get(timeout=300)
        if error is not None:
            raise RuntimeError(f"request failed after {done} finished: {error}")
        rid = result.get_response().id
        ttft.setdefault(rid, now - sent[rid])
        if result.as_numpy("finish_reason") is None:
            continue
        tokens += int(result.as_numpy("completion_tokens").reshape(-1)[0])
        done += 1
        if len(sent) < len(adapters):
            send()
    seconds = time.perf_counter() - started
    for client in clients:
        client.stop_stream()
        client.close()
    return list(ttft.values()), tokens, seconds, per_replica, affinity


def run_policy(repo: Path, log_dir: Path, policy, profile: Profile, adapters: list[str], setup: Setup,
               threads: int) -> Outcome:
    """One policy on fresh replicas: warm each engine with a base-model request, then the sequence."""
    with replicas(repo, setup.replicas, log_dir, threads) as servers:
        for server in servers:
            stream_all(server.grpc_url, [PROMPT], [None], 2)
        before = [cache_events(s.metrics_url) for s in servers]
        scraper = Scraper([s.metrics_url for s in servers], profile, setup.scrape_ms / 1000)
        load_before = os.getloadavg()[0]
        try:
            ttft, tokens, seconds, per_replica, affinity = drive(servers, scraper, policy, adapters, setup)
        finally:
            scraper.stop()
        after = [cache_events(s.metrics_url) for s in servers]
    counted = {key: sum(a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, before))
               for key in set().union(*after)}
    return Outcome(policy.name, ttft, tokens, seconds, per_replica, affinity, counted, scraper.scrapes,
                   scraper.scrape_seconds, max(load_before, os.getloadavg()[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 requests, one repeat; prints only")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--scrape-ms", type=float, default=Setup.scrape_ms)
    parser.add_argument("--lora-weight", type=float, help="the LoRA-affinity scorer's weight, not the deployed one")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the docs section even with --quick")
    args = parser.parse_args()
    quick = dict(requests=150, repeats=1) if args.quick else {}
    chosen = {k: v for k, v in (("requests", args.requests), ("repeats", args.repeats)) if v is not None}
    setup = Setup(**{**quick, **chosen, "scrape_ms": args.scrape_ms})
    root = ensure_scale_adapters(setup.adapters)
    config = EngineConfig(base_model=str(full_vocab_base(root)), adapter_dir=str(root / "adapters"), device="cpu",
                          max_loras=str(setup.max_loras), max_cpu_loras=setup.max_cpu_loras, kv_cache_memory="64MiB")
    sequence = zipf_sequence(scale_adapter_ids(setup.adapters), setup.requests, setup.seed)
    threads = max(1, len(os.sched_getaffinity(0)) // setup.replicas)
    profile = load_profile()
    if args.lora_weight is not None:
        profile = dataclasses.replace(profile, weights={**profile.weights, "lora-affinity-scorer": args.lora_weight})
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp) / "repository", config_parameters(config))
        for repeat in range(setup.repeats):
            policies = [RoundRobin(), EndpointPicker(profile, seed=setup.seed + repeat)]
            for policy in policies if repeat % 2 == 0 else policies[::-1]:  # alternate which goes first
                outcome = run_policy(repo, root / "routing-logs", policy, profile, sequence, setup, threads)
                print(json.dumps(outcome.brief()), flush=True)
                outcomes.append(outcome)
    bounds = {"disk": round_robin_and_sticky(sequence, setup.replicas, setup.max_cpu_loras),
              "slot": round_robin_and_sticky(sequence, setup.replicas, setup.max_loras)}
    print_summary(outcomes, bounds)
    if args.write or not (args.quick or args.no_write):
        write_section(outcomes, bounds, setup, profile.weights, len(set(sequence)), machine_description(), threads,
                      " ".join(["python -m bench.scale_out.routing", *sys.argv[1:]]), args.lora_weight)


if __name__ == "__main__":
    main()
