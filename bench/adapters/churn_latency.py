"""First-token latency of cold vs resident adapters, and admission order, under Zipf-distributed
requests over 1,000 adapters with max_loras 8.

    .venv/bin/python -m bench.adapters.churn_latency [--requests 2000] [--in-flight 64] [--quick] [--no-write]

Runs the engine in-process (its own loop thread, as in the server) on the tiny benchmark model with
1,000 adapters of ranks 8-64 (bench.adapters.memory_at_scale's), keeping `--in-flight` streamed requests
outstanding. For every request it records, inside the engine thread, whether its adapter already
held a device slot when the request was admitted (resident) or not (cold: a load from disk and/or
a slot to fill), and in which order requests were admitted. It reports time to first token (from
arrival) for cold and resident requests, and how many later arrivals were admitted before each
request. Floors: cold TTFT p99 <= 3x resident TTFT p99; no request admitted after more than
max_num_seqs later arrivals.
"""
from __future__ import annotations

import argparse
import json
import random
import threading
import time

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.models import ensure_scale_adapters, scale_adapter_ids
from bench.common.paths import BENCHMARKS_MD
from bench.common.reports import percentile
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

PROMPT = "SELECT name FROM orders WHERE"


class Observer:
    """Wraps the scheduler's admission (engine thread) to record residency and admission order."""

    def __init__(self, engine: LLMEngine) -> None:
        self.resident: dict[str, bool] = {}
        self.admitted: list[str] = []
        slots, start = engine.slots, engine.scheduler._try_start

        def try_start(seq, wanted):
            adapter = seq.adapter_future.result() if seq.adapter_future is not None else None
            resident = adapter is None or slots.holds(adapter.adapter_id)
            started = start(seq, wanted)
            if started:
                self.resident[seq.request.request_id] = resident
                self.admitted.append(seq.request.request_id)
            return started

        engine.scheduler._try_start = try_start


def run(engine: LLMEngine, order: list[str], in_flight: int, max_tokens: int) -> tuple[dict, dict]:
    arrival, first = {}, {}
    finished = threading.Semaphore(0)
    lock = threading.Lock()

    def on_output(out):
        with lock:
            first.setdefault(out.request_id, time.perf_counter())
        if out.finished:
            if out.error is not None:
                raise SystemExit(f"request {out.request_id} failed: {out.error}")
            finished.release()

    for i, adapter in enumerate(order):
        if i >= in_flight:
            finished.acquire()
        rid = str(i)
        arrival[rid] = time.perf_counter()
        engine.add_request(GenerationRequest(rid, PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                             adapter, stream=True), on_output)
    for _ in range(min(in_flight, len(order))):
        finished.acquire()
    return arrival, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="100 adapters, 300 requests; prints only")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    count, requests = (100, 300) if args.quick else (1000, args.requests)
    root = ensure_scale_adapters(count)
    ids = scale_adapter_ids(count)
    config = EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"), device="cpu",
                          max_loras=8, max_cpu_loras=128, max_num_seqs=32, kv_cache_memory="256MiB")
    engine = LLMEngine(config)
    observer = Observer(engine)
    engine.start()
    rng = random.Random(0)
    order = rng.choices(ids, weights=[1 / (i + 1) ** 1.1 for i in range(count)], k=requests)
    started = time.perf_counter()
    arrival, first = run(engine, order, args.in_flight, args.max_tokens)
    seconds = time.perf_counter() - started
    engine.shutdown()
    ttft = {rid: first[rid] - arrival[rid] for rid in arrival}
    cold = [ttft[r] for r, resident in observer.resident.items() if not resident]
    warm = [ttft[r] for r, resident in observer.resident.items() if resident]
    position = {rid: i for i, rid in enumerate(observer.admitted)}
    overtaken = [sum(1 for later in range(int(rid) + 1, requests) if position[str(later)] < position[rid])
                 for rid in arrival]
    report = {
        "adapters": count, "requests": requests, "in_flight": args.in_flight, "seconds": round(seconds, 1),
        "distinct_adapters": len(set(order)), "cold_requests": len(cold), "resident_requests": len(warm),
        "ttft_cold_p50_ms": round(percentile(cold, 50) * 1e3, 1),
        "ttft_cold_p99_ms": round(percentile(cold, 99) * 1e3, 1),
        "ttft_resident_p50_ms": round(percentile(warm, 50) * 1e3, 1),
        "ttft_resident_p99_ms": round(percentile(warm, 99) * 1e3, 1),
        "p99_ratio": round(percentile(cold, 99) / percentile(warm, 99), 2),
        "max_later_arrivals_admitted_first": max(overtaken), "max_num_seqs": config.max_num_seqs,
    }
    report["machine"] = host_facts(getattr(engine.runner.lora.context.backend, "isa", None)).line()
    print(json.dumps(report, indent=1))
    if not (args.quick or args.no_write):
        replace_section(BENCHMARKS_MD, "adapter_churn", render(report))


def render(r: dict) -> str:
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    return "\n".join([
        "## Adapter churn: Zipf over 1,000 adapters, max_loras 8", "",
        "Command: `.venv/bin/python -m bench.adapters.churn_latency`. In-process engine with its loop thread, "
        "tiny model, "
        f"{r['adapters']} adapters of ranks 8-64, {r['requests']} requests drawn Zipf(1.1) "
        f"({r['distinct_adapters']} distinct), {r['in_flight']} in flight, max_num_seqs {r['max_num_seqs']}; "
        "residency is recorded in the engine thread at each admission.", "",
        f"Machine: {r['machine']}. {quiet_note()}", "",
        "| requests | count | TTFT p50 (ms) | TTFT p99 (ms) |", "|---|---:|---:|---:|",
        f"| cold adapter (not in a slot when admitted) | {r['cold_requests']} | {r['ttft_cold_p50_ms']} | "
        f"{r['ttft_cold_p99_ms']} |",
        f"| resident adapter | {r['resident_requests']} | {r['ttft_resident_p50_ms']} | {r['ttft_resident_p99_ms']} |",
        "",
        f"- cold / resident TTFT p99: **{r['p99_ratio']}** (floor <= 3: {ok(r['p99_ratio'] <= 3)})",
        f"- most later arrivals admitted before one request: **{r['max_later_arrivals_admitted_first']}** "
        f"(floor <= max_num_seqs = {r['max_num_seqs']}: "
        f"{ok(r['max_later_arrivals_admitted_first'] <= r['max_num_seqs'])})",
    ])


if __name__ == "__main__":
    main()
