"""Issue 22 item 3's floor: what structured output costs, side by side in one run.

    python -m bench.serving.structured_output            # 100M model, 32 rows x 64 tokens, 5 rounds each
    python -m bench.serving.structured_output --write    # also writes its section of docs/benchmarks.md
    python -m bench.serving.structured_output --quick    # tiny model, 8 rows x 16 tokens: checks it works

The same engine runs the same batch twice per round, interleaved: every row free, then every row
under a JSON schema (four schemas, one per row in turn), rows spread over the base model and three
adapters. Each row makes exactly `--new-tokens` tokens either way (ignore_eos for the free rows;
schemas whose shortest document is longer than that for the constrained ones, which end at
`length`), so both variants run the same steps and tokens/s compare the steps' cost alone: the
masks filled per step (overlapping the forward), their upload and application in the sampler, and
advancing each row's matcher. The schemas are compiled before the first timed round. Floor:
constrained tokens/s >= 0.85 x free (a cost of at most 15%), as the median over rounds of each
round's ratio (the two runs of a round are seconds apart, so drift hits both alike); the best run
of each variant is printed too.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD
from multilora.config import EngineConfig
from multilora.demo import ALL_LINEAR, make_adapters, make_base_model
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

REPO = Path(__file__).resolve().parents[2]
FLOOR = 0.85
ADAPTERS = (None, "so-0", "so-1", "so-2")


@dataclass
class Setup:
    preset: str = "100m"
    rows: int = 32
    new_tokens: int = 64
    rounds: int = 5


def schemas(new_tokens: int) -> list[dict]:
    """Four schemas, each of whose documents is longer than `new_tokens` tokens (every token is at
    most one character here, or a few for the integers' digits), so a row runs until max_tokens."""
    n = new_tokens
    return [
        {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}, "minItems": n}},
         "required": ["values"]},
        {"type": "object", "properties": {"name": {"type": "string", "minLength": 4 * n, "maxLength": 8 * n},
                                          "ok": {"type": "boolean"}}, "required": ["name", "ok"]},
        {"type": "array", "minItems": n, "items": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["a", "b", "c"]}},
            "required": ["id", "tag"], "additionalProperties": False}},
        {"type": "object", "properties": {"words": {"type": "array", "minItems": n, "items": {
            "type": "string", "maxLength": 6}}}, "required": ["words"]},
    ]


def ensure_model(preset: str) -> Path:
    """A generated base model and three rank-16 adapters, cached under .run/bench/structured-<preset>."""
    root = REPO / ".run" / "bench" / f"structured-{preset}"
    if not (root / "base" / "config.json").exists():
        make_base_model(root / "base", preset)
    missing = [a for a in ADAPTERS[1:] if not (root / "adapters" / a / "adapter_model.safetensors").exists()]
    if missing:
        make_adapters(root / "base", [root / "adapters" / a for a in missing], 16, 32, False, ALL_LINEAR, seed=7)
    return root


def requests(setup: Setup, constrained: bool, round_: int) -> list[GenerationRequest]:
    formats = [{"type": "json_schema", "json_schema": {"schema": s}} for s in schemas(setup.new_tokens)]
    out = []
    for i in range(setup.rows):
        params = SamplingParams(max_tokens=setup.new_tokens, temperature=1.0, seed=1000 * (round_ + 1) + i,
                                ignore_eos=not constrained,
                                response_format=formats[i % len(formats)] if constrained else None)
        out.append(GenerationRequest(f"{'c' if constrained else 'f'}{round_}-{i}", f"Record {i} as JSON:", params,
                                     ADAPTERS[i % len(ADAPTERS)]))
    return out


def timed(engine: LLMEngine, batch: list[GenerationRequest], new_tokens: int) -> float:
    """Output tokens/s of one batch, run to completion; every row must make exactly new_tokens."""
    started = time.perf_counter()
    outputs = engine.generate(batch)
    seconds = time.perf_counter() - started
    finals = [outs[-1] for outs in outputs.values()]
    assert all(f.error is None and f.completion_tokens == new_tokens for f in finals), \
        [(f.request_id, f.finish_reason, f.completion_tokens, f.error) for f in finals]
    return sum(f.completion_tokens for f in finals) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 rows x 16 tokens, 1 round")
    parser.add_argument("--rows", type=int, default=Setup.rows)
    parser.add_argument("--new-tokens", type=int, default=Setup.new_tokens)
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    setup = Setup("tiny", 8, 16, 1) if args.quick else Setup("100m", args.rows, args.new_tokens, args.rounds)
    root = ensure_model(setup.preset)
    engine = LLMEngine(EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"),
                                    max_num_seqs=setup.rows, kv_cache_memory="512MiB"))
    for constrained in (False, True):  # warm-up: adapters loaded, schemas compiled, threads started
        timed(engine, requests(setup, constrained, -1), setup.new_tokens)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(setup.rounds):
        for constrained in (False, True) if round_ % 2 == 0 else (True, False):
            rates[constrained].append(timed(engine, requests(setup, constrained, round_), setup.new_tokens))
            print(f"round {round_}: {'constrained' if constrained else 'free':>11} {rates[constrained][-1]:8.1f} "
                  "tokens/s", flush=True)
    engine.shutdown()
    ratios = [c / f for c, f in zip(rates[True], rates[False])]
    ratio = statistics.median(ratios)
    facts = host_facts(getattr(engine.runner.lora.context.backend, "isa", None))
    lines = [f"Machine: {facts.line()}.", "",
             f"Model `{setup.preset}`, fp32; {setup.rows} rows x {setup.new_tokens} new tokens over the base model "
             "and 3 "
             f"rank-16 adapters; {setup.rounds} rounds, the two variants interleaved.", "",
             "| variant | tokens/s, every round | best |", "|---|---|---:|",
             f"| free | {', '.join(f'{r:.1f}' for r in rates[False])} | {max(rates[False]):.1f} |",
             f"| every row under a JSON schema | {', '.join(f'{r:.1f}' for r in rates[True])} "
             f"| {max(rates[True]):.1f} |",
             "", f"- constrained / free, median of the rounds' ratios: **{ratio:.3f}** (rounds {min(ratios):.3f}-"
             f"{max(ratios):.3f}; floor >= {FLOOR}: {'met' if ratio >= FLOOR else 'NOT met'})"]
    print("\n".join(lines))
    if args.write and not args.quick:
        replace_section(BENCHMARKS_MD, "structured_output", "\n".join(
            ["## Structured output: every row under a JSON schema vs free rows, 32 rows", "",
             "Command: `python -m bench.serving.structured_output --write` (its docstring has the setup). "
             + quiet_note(), "", *lines]))


if __name__ == "__main__":
    main()
