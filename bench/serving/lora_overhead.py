"""What 32 distinct adapters cost the engine in-process, prefill and decode apart, on every ISA
level of the fused CPU LoRA op, against the base model in the same rounds (issue 19's floors).

    python -m bench.serving.lora_overhead [--rounds 5] [--write]
    python -m bench.serving.lora_overhead --quick     # tiny model, 8 rows: checks it works (prints only)

Model: the generated `100m` Llama of bench/common/models.py (12 layers, hidden 768, fp32), 32
rank-16 adapters on all seven projections, all resident (max_loras 32). Workload: 32 prompts of
128 tokens; request i on adapter i (32 distinct adapters in every step), or every request on the
base model. Per variant and round, two runs:
- prefill: the 32 requests with max_tokens 1, timed until the last one ends (the prompts go through
  in chunks of max_num_batched_tokens, as served);
- decode: the 32 requests with max_tokens 1 + `--new-tokens` (ignore_eos); the steps after every
  request has its first token are timed: 32 decode rows a step, nothing else.
The whole run's tokens/s (prefill + decode, as bench.serving.engine_throughput counts it) is the
second run's output tokens over its whole time. Variants run round-robin within each round (base,
then each ISA level the CPU runs, switched on the same engine), so drift hits all alike; the best
round of each is compared. Floors: prefill time with adapters <= 1.15x the base's; decode and
whole-run tokens/s >= 0.85x the base's, on every ISA level.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.models import adapter_ids, ensure_bench_model, exact_prompts
from bench.common.paths import BENCHMARKS_MD
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

PREFILL_FLOOR = 1.15  # prefill time with adapters / base, at most
DECODE_FLOOR = 0.85  # tokens/s with adapters / base, at least


@dataclass
class Setup:
    preset: str = "100m"
    rows: int = 32
    prompt_len: int = 128
    new_tokens: int = 64
    rounds: int = 5


@dataclass
class Round:
    prefill_s: float
    decode_tps: float  # decode steps alone
    whole_tps: float  # the decode run from its first request to its last token


def run_requests(engine: LLMEngine, prompts: list[str], adapters: list[str | None], max_tokens: int,
                 tag: str) -> tuple[float, float]:
    """(seconds until every request has its first token, seconds until the last ends)."""
    first: set[str] = set()
    ended = 0

    def on_output(out, rid: str) -> None:
        nonlocal ended
        first.add(rid)
        if out.finished:
            assert out.error is None and out.completion_tokens == max_tokens, out
            ended += 1

    started = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        rid = f"{tag}-{i}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(GenerationRequest(rid, prompt, params, adapter), lambda out, rid=rid: on_output(out, rid))
    all_first = None
    while engine.has_unfinished():
        engine.step()
        if all_first is None and len(first) == len(prompts):
            all_first = time.perf_counter()
    assert ended == len(prompts)
    return all_first - started, time.perf_counter() - started


def measure(engine: LLMEngine, setup: Setup, prompts: list[str], adapters: list[str | None], tag: str) -> Round:
    _, prefill = run_requests(engine, prompts, adapters, 1, f"{tag}-p")
    first, whole = run_requests(engine, prompts, adapters, 1 + setup.new_tokens, f"{tag}-d")
    return Round(prefill, setup.rows * setup.new_tokens / (whole - first),
                 setup.rows * (1 + setup.new_tokens) / whole)


def table(variants: dict[str, list[Round]]) -> list[str]:
    base = variants["base"]
    best_prefill = min(r.prefill_s for r in base)
    best_decode = max(r.decode_tps for r in base)
    best_whole = max(r.whole_tps for r in base)
    lines = ["| variant | prefill s (best) | prefill / base | decode tok/s (best) | decode / base "
             "| whole run tok/s (best) | whole / base |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for name, rounds in variants.items():
        prefill, decode, whole = (min(r.prefill_s for r in rounds), max(r.decode_tps for r in rounds),
                                  max(r.whole_tps for r in rounds))
        if name == "base":
            lines.append(f"| base model | {prefill:.2f} | | {decode:.1f} | | {whole:.1f} | |")
            continue
        p, d, w = prefill / best_prefill, decode / best_decode, whole / best_whole
        lines.append(f"| 32 adapters, ISA level {name} | {prefill:.2f} | **{p:.3f}** | {decode:.1f} | **{d:.3f}** "
                     f"| {whole:.1f} | **{w:.3f}** |")
        ok = p <= PREFILL_FLOOR and d >= DECODE_FLOOR and w >= DECODE_FLOOR
        verdicts.append(f"- {name}: prefill {p:.3f} (floor <= {PREFILL_FLOOR}), decode {d:.3f} and whole run "
                        f"{w:.3f} (floor >= {DECODE_FLOOR}): {'met' if ok else 'NOT met'}")
    return lines + [""] + verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 rows x 8 tokens, 1 round (prints only)")
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    setup = Setup("tiny", 8, 32, 8, 1) if args.quick else Setup(rounds=args.rounds)
    root = ensure_bench_model(setup.rows, setup.preset)
    engine = LLMEngine(EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"),
                                    kv_cache_memory="2GiB", max_num_seqs=setup.rows, max_loras=setup.rows,
                                    max_cpu_loras=setup.rows))
    backend = engine.runner.lora.context.backend
    levels = list(backend.op.isa_levels()) if hasattr(backend, "op") else []
    prompts = exact_prompts(engine.tokenizer, setup.rows, setup.prompt_len)
    ids = adapter_ids(setup.rows)
    for adapter in ids:
        engine.manage("load", adapter)
    plans = {"base": [None] * setup.rows, **{level: list(ids) for level in levels or ["torch"]}}
    variants: dict[str, list[Round]] = {name: [] for name in plans}
    for name, adapters in plans.items():  # warm-up: oneDNN primitives for every row count, adapters in slots
        if name in levels:
            backend.isa = name
        measure(engine, Setup(setup.preset, setup.rows, setup.prompt_len, 2, 1), prompts, adapters, f"w-{name}")
    for round_ in range(setup.rounds):
        for name, adapters in plans.items():
            if name in levels:
                backend.isa = name
            variants[name].append(measure(engine, setup, prompts, adapters, f"{round_}-{name}"))
            r = variants[name][-1]
            print(f"round {round_} {name:>8}: prefill {r.prefill_s:6.2f} s  decode {r.decode_tps:6.1f} tok/s  "
                  f"whole {r.whole_tps:6.1f} tok/s", flush=True)
    engine.shutdown()
    facts = host_facts(None)
    lines = [f"Machine: {facts.line()}.", "",
             f"Model `{setup.preset}`, fp32; {setup.rows} prompts of {setup.prompt_len} tokens, request i on adapter i "
             f"({setup.rows} distinct rank-16 adapters on all seven projections, all resident) or all on the base "
             f"model; decode: {setup.new_tokens} tokens a row; best of {setup.rounds} interleaved rounds.", "",
             *table(variants)]
    print("\n".join(lines))
    if args.write and not args.quick:
        replace_section(BENCHMARKS_MD, "lora_overhead", "\n".join(
            ["## 32 distinct adapters in-process: prefill and decode per ISA level", "",
             "Command: `python -m bench.serving.lora_overhead --write` (its docstring has the setup). " + quiet_note(),
             "", *lines]))


if __name__ == "__main__":
    main()
