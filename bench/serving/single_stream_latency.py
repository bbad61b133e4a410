"""One user's latency: ms per decoded token of our engine (in-process LLMEngine) against transformers'
`generate` on the same model, one request at a time, interleaved in one process.

    python -m bench.serving.single_stream_latency [--rounds 7] [--tokens 64] [--threads 1]
                                                       [--adapter pirate] [--write]

Model: the demo (SmolLM2-135M-Instruct, fp32 on CPU, model_repository/lora_llm/demo), greedy,
`--tokens` new tokens (ignore_eos). Decode ms/token is the median gap between consecutive tokens
(ours: the engine's token times; transformers: a streamer's), so the prompt's prefill is left
out. Each round runs ours then transformers; the figure is the median over rounds of the
per-round ratio (ours / transformers): on a shared machine absolute times drift by several x
between minutes, a ratio within one round much less. With `--threads 1` the gaps are also taken
on the thread's CPU clock, which leaves out the time other jobs held the core.

Op counts per decode token come from torch.profiler: the aten ops in a profile of decode steps
(ours: LLMEngine.step; transformers: generate of `--tokens` tokens minus generate of one, so its
prefill cancels), "top level" counting only ops not called by another aten op (what Python
dispatches), "all" every aten op including the ones inside others.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD, REPO
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

DEMO = REPO / "model_repository" / "lora_llm" / "demo"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Gaps:
    """Median gaps between consecutive decoded tokens: wall seconds and the calling thread's CPU
    seconds (with one torch thread all the work runs there, and CPU time leaves out the time other
    jobs held the core)."""

    wall: float
    cpu: float

    @classmethod
    def of(cls, walls: list[float], cpus: list[float]) -> "Gaps":
        return cls(statistics.median(b - a for a, b in zip(walls, walls[1:])),
                   statistics.median(b - a for a, b in zip(cpus, cpus[1:])))


def engine_gaps(engine: LLMEngine, prompt: str, tokens: int, adapter: str | None) -> Gaps:
    """One request alone, stepped here: each step after the first decodes one token."""
    request = GenerationRequest("r", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), adapter)
    finals = []
    engine.add_request(request, finals.append)
    walls, cpus = [], []
    while engine.has_unfinished():
        engine.step()
        walls.append(time.perf_counter())
        cpus.append(time.thread_time())
    assert finals[-1].error is None and finals[-1].completion_tokens == tokens, finals[-1]
    return Gaps.of(walls[1:], cpus[1:])


class TokenTimes:
    """A transformers streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def put(self, value) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(time.thread_time())

    def end(self) -> None:
        pass


def hf_generate(model, ids: torch.Tensor, tokens: int, streamer=None) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, streamer=streamer, pad_token_id=model.config.eos_token_id)


def hf_gaps(model, ids: torch.Tensor, tokens: int) -> Gaps:
    streamer = TokenTimes()
    hf_generate(model, ids, tokens, streamer)
    return Gaps.of(streamer.walls[2:], streamer.cpus[2:])  # [0] is the prompt, [1] the prefill's token


def aten_counts(prof) -> tuple[int, int]:
    """(top-level aten ops, all aten ops) in a profile."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    return top, len(events)


def engine_ops_per_token(engine: LLMEngine, prompt: str, tokens: int, adapter: str | None) -> tuple[float, float]:
    request = GenerationRequest("p", prompt, SamplingParams(max_tokens=tokens + 2, ignore_eos=True), adapter)
    engine.add_request(request, lambda out: None)
    engine.step()  # the prompt, and the first token
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(tokens):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    top, total = aten_counts(prof)
    return top / tokens, total / tokens


def hf_ops_per_token(model, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    counts = []
    for n in (1, tokens + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hf_generate(model, ids, n)
        counts.append(aten_counts(prof))
    return (counts[1][0] - counts[0][0]) / tokens, (counts[1][1] - counts[0][1]) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO / "SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    parser.add_argument("--adapter", help="our engine serves the request with this demo adapter (transformers: base)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = LLMEngine(EngineConfig(base_model=str(args.model), adapter_dir=str(DEMO / "adapters"), device="cpu",
                                    max_num_seqs=4, kv_cache_memory="256MiB"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    engine_gaps(engine, PROMPT, 4, args.adapter)  # warm-up: oneDNN primitives, adapter load
    hf_generate(model, ids, 4)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(engine_gaps(engine, PROMPT, args.tokens, args.adapter))
        theirs.append(hf_gaps(model, ids, args.tokens))
        print(f"ms/token ours {1e3 * ours[-1].wall:.1f} (CPU {1e3 * ours[-1].cpu:.1f}), transformers "
              f"{1e3 * theirs[-1].wall:.1f} (CPU {1e3 * theirs[-1].cpu:.1f})", flush=True)
    op_tokens = min(args.tokens, 16)
    our_ops, their_ops = engine_ops_per_token(engine, PROMPT, op_tokens, args.adapter), hf_ops_per_token(model, ids, op_tokens)
    facts = host_facts(getattr(engine.runner.lora.context.backend, "isa", None) if engine.runner.lora else None)
    one_thread = torch.get_num_threads() == 1
    rows = [("wall", [g.wall for g in ours], [g.wall for g in theirs])]
    if one_thread:
        rows.append(("thread CPU", [g.cpu for g in ours], [g.cpu for g in theirs]))
    lines = [f"Machine: {facts.line()}.", "",
             f"Model: {args.model.name}, fp32, {torch.get_num_threads()} torch threads; one request, "
             f"{len(ids[0])} prompt tokens, {args.tokens} new tokens, greedy"
             f"{f', our engine with adapter {args.adapter}' if args.adapter else ''}; {args.rounds} interleaved rounds.", "",
             "| per decoded token | ours | transformers `generate` | ours / transformers, per round: median (min-max) |",
             "|---|---:|---:|---:|"]
    for name, a, b in rows:
        ratios = [x / y for x, y in zip(a, b)]
        lines.append(f"| ms, {name} (median of rounds) | {1e3 * statistics.median(a):.1f} | {1e3 * statistics.median(b):.1f} "
                     f"| **{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f}) |")
    lines += [f"| aten ops, top level | {our_ops[0]:.0f} | {their_ops[0]:.0f} | {our_ops[0] / their_ops[0]:.2f} |",
              f"| aten ops, all | {our_ops[1]:.0f} | {their_ops[1]:.0f} | {our_ops[1] / their_ops[1]:.2f} |"]
    print("\n".join(lines))
    engine.shutdown()
    if args.write:
        replace_section(BENCHMARKS_MD, "single_stream_latency", "\n".join(
            ["## One user's latency: our engine vs transformers, one request", "",
             "Command: `python -m bench.serving.single_stream_latency --write` (its docstring has the setup). "
             + quiet_note(), "", *lines]))


if __name__ == "__main__":
    main()
