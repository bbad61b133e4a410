"""What 32 distinct adapters cost the engine in-process, prefill and decode apart, on every ISA
level of the fused CPU LoRA op, against the base model in the same rounds (issue 19's floors).

    python -m bench.serving.lora_overhead [--rounds 5] [--write]
    python -m bench.serving.lora_overhead --quick     # tiny model, 8 rows: checks it works (prints only)
    ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.serving.lora_overhead --write  # oneDNN as on an AVX2-only CPU

Model: the generated `100m` Llama of bench/common/models.py (12 layers, hidden 768, fp32), 32
rank-16 adapters on all seven projections, all resident (max_loras 32). Workload: 32 prompts of
128 tokens; request i on adapter i (32 distinct adapters in every step), or every request on the
base model. Per variant and round, two runs:
- prefill: the 32 requests with max_tokens 1, timed until the last one ends (the prompts go through
  in chunks of max_num_batched_tokens, as served);
- whole: the 32 requests with max_tokens 1 + `--new-tokens` (ignore_eos); its tokens/s (prefill +
  decode, as bench.serving.engine_throughput counts it) is its output tokens over its time.
Decode tokens/s: the extra tokens over the extra time, (whole - prefill) of the same round (the
later rows' prefill overlaps the earlier rows' decode in both; what the extra time holds is the
32-row decode steps). Variants run round-robin within each round (base, then each ISA level the
CPU runs, switched on the same engine), so drift hits all alike; ratios are the median over rounds
of each round's ratio. Floors: prefill time with adapters <= 1.15x the base's on every ISA level;
decode and whole-run tokens/s >= 0.85x the base's on the best level and on v3 (AVX2; the SSE
baseline is shown, without a floor).
"""
from __future__ import annotations

import argparse
import os
import statistics
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
                 tag: str) -> float:
    """Seconds from adding the requests until the last one ends."""
    requests = [GenerationRequest(f"{tag}-{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter)
                for i, (prompt, adapter) in enumerate(zip(prompts, adapters))]
    started = time.perf_counter()
    outputs = engine.generate(requests)
    seconds = time.perf_counter() - started
    finals = [outs[-1] for outs in outputs.values()]
    assert all(f.error is None and f.completion_tokens == max_tokens for f in finals), finals
    return seconds


def measure(engine: LLMEngine, setup: Setup, prompts: list[str], adapters: list[str | None], tag: str) -> Round:
    prefill = run_requests(engine, prompts, adapters, 1, f"{tag}-p")
    whole = run_requests(engine, prompts, adapters, 1 + setup.new_tokens, f"{tag}-d")
    rows = setup.rows
    return Round(prefill, rows * setup.new_tokens / (whole - prefill), rows * (1 + setup.new_tokens) / whole)


def ratio_cell(ours: list[float], base: list[float]) -> tuple[float, str]:
    """The median over rounds of each round's ratio, and the cell that shows it with its range."""
    ratios = [a / b for a, b in zip(ours, base)]
    median = statistics.median(ratios)
    return median, f"**{median:.3f}** ({min(ratios):.3f}-{max(ratios):.3f})"


def table(variants: dict[str, list[Round]], rows: int) -> list[str]:
    """Per variant: best of the rounds, and the median (range) of its per-round ratios to the base;
    the floors are judged on those medians (each round's runs are seconds apart: drift hits both)."""
    base = variants["base"]
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
        p, p_cell = ratio_cell([r.prefill_s for r in rounds], [r.prefill_s for r in base])
        d, d_cell = ratio_cell([r.decode_tps for r in rounds], [r.decode_tps for r in base])
        w, w_cell = ratio_cell([r.whole_tps for r in rounds], [r.whole_tps for r in base])
        lines.append(f"| {rows} adapters, ISA level {name} | {prefill:.2f} | {p_cell} | {decode:.1f} | {d_cell} "
                     f"| {whole:.1f} | {w_cell} |")
        if name == "baseline":
            met = "met" if p <= PREFILL_FLOOR else "NOT met"
            verdicts.append(f"- {name}: prefill {p:.3f} (floor <= {PREFILL_FLOOR}: {met}); "
                            f"decode {d:.3f}, whole run {w:.3f} (no floor on SSE)")
            continue
        ok = p <= PREFILL_FLOOR and d >= DECODE_FLOOR and w >= DECODE_FLOOR
        verdicts.append(f"- {name}: prefill {p:.3f} (floor <= {PREFILL_FLOOR}), decode {d:.3f} and whole run "
                        f"{w:.3f} (floor >= {DECODE_FLOOR}): {'met' if ok else 'NOT met'}")
    return lines + ["", "Ratios: median over the rounds of each round's ratio (range in brackets).", ""] + verdicts


def bytes_bound(root, ids: list[str], base_decode_tps: float, rows: int, copy_gbs: float) -> str:
    """What reading the adapters alone must cost a decode step, at this machine's copy bandwidth."""
    nbytes = sum((root / "adapters" / a / "adapter_model.safetensors").stat().st_size for a in ids)
    step = rows / base_decode_tps
    extra = nbytes / (copy_gbs * 1e9)
    return (f"- what the bytes allow: a decode step reads the {len(ids)} adapters' weights, {nbytes / 1e6:.0f} MB, "
            f"{1e3 * extra:.1f} ms at the copy bandwidth of this run, against the base model's "
            f"{1e3 * step:.1f} ms step: decode / base <= **{step / (step + extra):.3f}** even if the LoRA op cost "
            "nothing but those bytes")


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
             *table(variants, setup.rows),
             bytes_bound(root, ids, max(r.decode_tps for r in variants["base"]), setup.rows, facts.copy_gbs)]
    print("\n".join(lines))
    if args.write and not args.quick:
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")  # a run as on an AVX2-only CPU has a section of its own
        name, title, env = (("lora_overhead", "", "") if not onednn else
                            (f"lora_overhead_onednn_{onednn.lower()}", f", oneDNN limited to {onednn}",
                             f"ONEDNN_MAX_CPU_ISA={onednn} "))
        replace_section(BENCHMARKS_MD, name, "\n".join(
            [f"## 32 distinct adapters in-process: prefill and decode per ISA level{title}", "",
             f"Command: `{env}python -m bench.serving.lora_overhead --write` (its docstring has the setup). "
             + quiet_note(),
             "", *lines]))


if __name__ == "__main__":
    main()
