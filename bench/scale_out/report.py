"""The routing benchmark's results: one Outcome per policy run, the comparison printed side by side,
and its section of docs/benchmarks.md."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter

from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD
from bench.common.reports import percentile

SECTION = "routing_scale_out"  # a run with other weights writes SECTION_lora_weight_<w>
FLOOR_LOADS, FLOOR_TTFT_P99 = 3.0, 1.5  # issue 21 item 4: round-robin / EPP


@dataclasses.dataclass
class Outcome:
    """One policy over the whole request sequence, on fresh replicas."""

    policy: str
    ttft: list[float]  # seconds, one per request
    tokens: int
    seconds: float
    per_replica: list[int]  # requests routed to each replica
    affinity: Counter[float]  # picks per LoRA-affinity score of the replica picked, as last scraped
    cache: dict[tuple[str, str], float]  # (tier, event) -> count over the run, all replicas
    scrapes: int
    scrape_seconds: float
    load_average: float  # the highest 1-minute load average seen at the start and end

    @property
    def disk_loads(self) -> int:
        """Adapters read from disk into a host tier (host-tier misses)."""
        return int(self.cache.get(("host", "miss"), 0))

    @property
    def slot_loads(self) -> int:
        """Adapters put into a device slot (device-tier misses)."""
        return int(self.cache.get(("device", "miss"), 0))

    def picks(self) -> str:
        """Shares of the picks where the adapter was running on the replica (1), a slot was free (0.8),
        it was waiting there (0.6), or none of these (0)."""
        total = sum(self.affinity.values()) or 1
        return " / ".join(f"{100 * self.affinity.get(score, 0) / total:.0f}%" for score in (1.0, 0.8, 0.6, 0.0))

    def brief(self) -> dict:
        return {"policy": self.policy, "disk_loads": self.disk_loads, "slot_loads": self.slot_loads,
                "ttft_p50_ms": round(1000 * percentile(self.ttft, 50), 1),
                "ttft_p99_ms": round(1000 * percentile(self.ttft, 99), 1),
                "tokens_per_s": round(self.tokens / self.seconds, 1), "per_replica": self.per_replica,
                "picks_by_affinity": self.picks(),
                "scrape_ms_mean": round(1000 * self.scrape_seconds / max(1, self.scrapes), 1),
                "load_average": round(self.load_average, 1)}


@dataclasses.dataclass
class Totals:
    """One policy over every repeat: loads summed, TTFTs pooled, tokens over seconds."""

    disk_loads: int
    slot_loads: int
    ttft_p50: float
    ttft_p99: float
    tokens_per_s: float

    @classmethod
    def of(cls, runs: list[Outcome]) -> Totals:
        ttft = [t for r in runs for t in r.ttft]
        return cls(sum(r.disk_loads for r in runs), sum(r.slot_loads for r in runs), percentile(ttft, 50),
                   percentile(ttft, 99), sum(r.tokens for r in runs) / sum(r.seconds for r in runs))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def compare(outcomes: list[Outcome]) -> dict[str, float]:
    """Round-robin over EPP for loads and TTFT (higher: the EPP better), EPP over round-robin for tokens/s."""
    rr = Totals.of([o for o in outcomes if o.policy == "round-robin"])
    epp = Totals.of([o for o in outcomes if o.policy != "round-robin"])
    return {"disk_loads": _ratio(rr.disk_loads, epp.disk_loads), "slot_loads": _ratio(rr.slot_loads, epp.slot_loads),
            "ttft_p50": _ratio(rr.ttft_p50, epp.ttft_p50), "ttft_p99": _ratio(rr.ttft_p99, epp.ttft_p99),
            "tokens_per_s": _ratio(epp.tokens_per_s, rr.tokens_per_s)}


def _met(value: float, floor: float) -> str:
    return f"floor >= {floor:g}: {'met' if value >= floor else 'NOT met'}"


def _rows(outcomes: list[Outcome]) -> list[str]:
    rows = []
    for n, o in enumerate(outcomes):
        rows.append(f"| {n // 2 + 1} | {o.policy} | {o.disk_loads} | {o.slot_loads} | "
                    f"{1000 * percentile(o.ttft, 50):.0f} | {1000 * percentile(o.ttft, 99):.0f} | "
                    f"{o.tokens / o.seconds:.1f} | {' / '.join(map(str, o.per_replica))} | {o.picks()} |")
    return rows


def _totals_rows(outcomes: list[Outcome]) -> list[str]:
    rows = []
    for name in dict.fromkeys(o.policy for o in outcomes):
        t = Totals.of([o for o in outcomes if o.policy == name])
        rows.append(f"| all | {name} | {t.disk_loads} | {t.slot_loads} | {1000 * t.ttft_p50:.0f} | "
                    f"{1000 * t.ttft_p99:.0f} | {t.tokens_per_s:.1f} | | |")
    return rows


HEADER = ["| repeat | routing | disk loads | slot loads | TTFT p50 (ms) | TTFT p99 (ms) | tokens/s "
          "| requests per replica | picks: adapter running there / slot free / queued there / none |",
          "|---|---|---:|---:|---:|---:|---:|---|---|"]


def ratio_lines(outcomes: list[Outcome], bounds: dict[str, tuple[int, int]]) -> list[str]:
    """The measured ratios against the floors, and `bounds` (tier -> loads under round-robin and
    under a perfectly sticky router, from bench.scale_out.bounds) as the most any routing could reach."""
    r = compare(outcomes)
    (rr_disk, sticky_disk), (rr_slot, sticky_slot) = bounds["disk"], bounds["slot"]
    return [f"- adapter loads from disk, round-robin / EPP: **{r['disk_loads']:.2f}x** "
            f"({_met(r['disk_loads'], FLOOR_LOADS)})",
            f"- adapter slot loads, round-robin / EPP: **{r['slot_loads']:.2f}x** "
            f"({_met(r['slot_loads'], FLOOR_LOADS)})",
            f"- TTFT p99, round-robin / EPP: **{r['ttft_p99']:.2f}x** ({_met(r['ttft_p99'], FLOOR_TTFT_P99)}); "
            f"p50: {r['ttft_p50']:.2f}x",
            f"- tokens/s, EPP / round-robin: {r['tokens_per_s']:.2f}x",
            "- the most any routing could save here (`bench.scale_out.bounds`: each tier an LRU cache, requests "
            f"one at a time): round-robin {rr_disk} disk / {rr_slot} slot loads per run, a router that always "
            f"sends an adapter to the same replica {sticky_disk} / {sticky_slot}: "
            f"**{rr_disk / sticky_disk:.2f}x / {rr_slot / sticky_slot:.2f}x**"]


def print_summary(outcomes: list[Outcome], bounds: dict[str, tuple[int, int]]) -> None:
    print("\n".join(["", *HEADER, *_rows(outcomes), *_totals_rows(outcomes), "", *ratio_lines(outcomes, bounds)]))


def write_section(outcomes: list[Outcome], bounds: dict[str, tuple[int, int]], setup, weights: dict[str, float],
                  distinct: int, machine: str, threads: int, command: str, lora_weight: float | None) -> None:
    """The section SECTION of docs/benchmarks.md (with `lora_weight`, the weight of the LoRA-affinity
    scorer when not the deployed one, a section of its own): setup, the runs side by side, ratios."""
    cores = os.cpu_count() or 1
    load = max(o.load_average for o in outcomes)
    weight_text = ", ".join(f"{name} {weight:g}" for name, weight in weights.items())
    variant = f" (LoRA-affinity weight {lora_weight:g})" if lora_weight is not None else ""
    lines = [f"## Scale-out routing: the EPP's scorers{variant} vs round-robin, 3 replicas", "",
             f"Command: `.venv/bin/{command}`. Machine: {machine}. {setup.replicas} tritonservers on loopback "
             f"(the `tiny` generated Llama on CPU, {threads} torch thread(s) each), max_loras {setup.max_loras}, "
             f"max_cpu_loras {setup.max_cpu_loras}, {setup.adapters} generated adapters (ranks 8-64) shared by all; "
             f"{setup.requests} requests drawn Zipf(1.1) over the adapters ({distinct} distinct: no routing loads "
             f"fewer from disk), {setup.in_flight} in flight, {setup.max_tokens} new tokens each, streamed over gRPC. "
             "The same sequence runs under each routing, on fresh servers each time (cold caches), "
             f"{setup.repeats} repeat(s) alternating which goes first.", "",
             "**EPP scorers** is `bench.scale_out.epp`, a stand-in for the endpoint picker written for this "
             "benchmark, not part of the product: it scrapes every replica's metrics page each "
             f"{setup.scrape_ms:g} ms and scores the replicas with the queue, KV-cache and LoRA-affinity scorers "
             f"and their weights ({weight_text}; those of docker/kserve/inference-pool.yaml unless `--lora-weight` "
             "says otherwise) as llm-d-router's do (formulas in its docstring). Loads are counted by the servers "
             "(`lora_adapter_cache_events_total`): disk loads are host-tier misses, slot loads device-tier misses. "
             "TTFT runs from sending a request to its first streamed token. The last column says, for each "
             "routing, what the scrape before each pick showed about the request's adapter on the replica picked.",
             ""]
    if load > cores:
        lines += [f"**Loaded machine**: the 1-minute load average reached {load:.1f} on {cores} cores while this "
                  "ran (other jobs shared the machine), so TTFT and tokens/s here are not a measurement of this "
                  "setup: rerun on a quiet machine. The load counts depend much less on timing: they are what "
                  "each routing did with the same requests.", ""]
    lines += [*HEADER, *_rows(outcomes), *_totals_rows(outcomes), "", *ratio_lines(outcomes, bounds)]
    name = SECTION if lora_weight is None else f"{SECTION}_lora_weight_{lora_weight:g}"
    replace_section(BENCHMARKS_MD, name, "\n".join(lines))
