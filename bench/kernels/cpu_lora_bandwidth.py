"""The fused CPU LoRA op alone: achieved GB/s on decode steps and GFLOP/s on prefill, per ISA level
and thread count, against a copy and a GEMM measured in the same rounds.

    python -m bench.kernels.cpu_lora_bandwidth [--preset 100m|smollm2] [--adapters 32] [--rank 16]
                                               [--rounds 7] [--threads 1 2] [--write]

Decode (bandwidth-bound): one step's LoRA calls of the whole model (every layer, its four fused
projections, all seven targets), one token for each of `adapters` distinct adapters: the step must
read each adapter's A and B once, so achieved GB/s = those bytes (+ activations) / time, next to a
copy (`copy_`, read + write) of the same number of bytes at the same thread count. The floor of
issue 19 is >= 0.5 of the copy on every ISA level. The weights (hundreds of MB, far beyond the
last-level cache) sit in huge-page host buffers, one per adapter, as the engine keeps them
(adapters/memory.host_buffer).
Prefill (compute-bound): one layer's calls for 4 adapters x 128 tokens, GFLOP/s next to a torch.mm
(512 x 768 x 2048) at the same thread count.

Every case (ISA level x threads, copy, GEMM) runs once per round, rounds interleaved: on a shared
machine only figures of the same rounds compare, and the best round is the least disturbed one.
One-thread cases are timed by the calling thread's CPU time too (the op, the copy and the GEMM
then run in that thread), which leaves out the time other jobs held the core: the figures in GB/s
and GFLOP/s take it there, the wall clock with two threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from bench.common.cpu import gemm_gflops, quiet_note, vector_features
from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD
from multilora.adapters.memory import host_buffer
from multilora.demo import PRESETS
from multilora.lora import native
from multilora.lora.backends.cpu import CpuBackend
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraTarget, LoraTargets, LoraWeightTable
from multilora.models.families import family_of, input_size, output_sizes

# SmolLM2-135M-Instruct's shapes (the demo model); 100m is the benchmarks' generated Llama.
SHAPES = {"smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3)}
for _name, _p in PRESETS.items():
    SHAPES[_name] = dict(hidden_size=_p.hidden_size, intermediate_size=_p.intermediate_size,
                         num_hidden_layers=_p.num_hidden_layers, num_attention_heads=_p.num_attention_heads,
                         num_key_value_heads=_p.num_key_value_heads)
PREFILL_ADAPTERS, PREFILL_TOKENS = 4, 128

Apply = Callable[..., None]  # op.apply without its last argument (the ISA level)


@dataclass
class Projection:
    targets: LoraTargets
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Step:
    """The LoRA calls of one step: per projection its targets, x and y; the plan; the bytes a pass reads."""

    projections: list[Projection]
    rows: torch.Tensor
    items: torch.Tensor
    weight_bytes: int
    activation_bytes: int
    flops: int

    def run(self, backend: CpuBackend, apply: Apply) -> None:
        for p in self.projections:
            w = backend.native_weights(p.targets)
            apply(p.y, p.x, w.columns, w.weights, self.rows, self.items)


def build_step(preset: str, layers: int | None, adapters: int, rank: int, tokens_per_adapter: int,
               backend: CpuBackend) -> Step:
    """Random rank-`rank` adapters on all seven targets of `layers` layers, each in one huge-page host
    buffer, and a step of `tokens_per_adapter` tokens for each (grouped by adapter)."""
    config = LlamaConfig(**SHAPES[preset])
    family = family_of(config)
    layers = layers or config.num_hidden_layers
    shapes = [(input_size(config, p), output_sizes(config, p)) for p in family.projections]
    per_adapter = layers * sum(rank * (h_in + h_out) for h_in, sizes in shapes for h_out in sizes)
    gen = torch.Generator().manual_seed(0)
    buffers = []
    for _ in range(adapters):
        buffer = host_buffer(per_adapter, torch.float32)
        buffer.copy_(torch.randn(per_adapter, generator=gen) * 0.05)
        buffers.append(buffer)
    tokens = adapters * tokens_per_adapter
    offset, projections, flops = 0, [], 0
    for _ in range(layers):
        for h_in, sizes in shapes:
            targets, start = [], 0
            for h_out in sizes:
                table = LoraWeightTable(h_in, h_out, adapters)
                for slot, buffer in enumerate(buffers):
                    a = buffer[offset:offset + h_in * rank].view(h_in, rank)
                    b = buffer[offset + h_in * rank:offset + rank * (h_in + h_out)].view(rank, h_out)
                    table.set_slot(slot, a, b)
                offset += rank * (h_in + h_out)
                targets.append(LoraTarget("t", start, start + h_out, table))
                start += h_out
                flops += 2 * tokens * rank * (h_in + h_out)
            projections.append(Projection(LoraTargets(targets), torch.randn(tokens, h_in, generator=gen),
                                          torch.zeros(tokens, start)))
    slots = [s for s in range(adapters) for _ in range(tokens_per_adapter)]
    plan = backend.plan_step(LoraBatch.from_token_slots(slots))
    activations = sum(p.x.numel() + 2 * p.y.numel() for p in projections) * 4
    return Step(projections, plan.rows, plan.items, adapters * per_adapter * 4, activations, flops)


@dataclass
class Case:
    label: str
    threads: int
    fn: Callable[[], object]
    times: list[float]  # wall seconds per round
    cpu: list[float]  # the calling thread's CPU seconds per round

    def run(self) -> None:
        torch.set_num_threads(self.threads)
        wall, cpu = time.perf_counter(), time.thread_time()
        self.fn()
        self.cpu.append(time.thread_time() - cpu)
        self.times.append(time.perf_counter() - wall)

    @property
    def best(self) -> float:
        """Best seconds of the rounds: thread CPU time with one thread, else the wall clock."""
        return min(self.cpu) if self.threads == 1 else min(self.times)

    def cells(self) -> str:
        cpu = f"{1e3 * min(self.cpu):.2f}" if self.threads == 1 else "-"
        return (f"| {self.label} | {self.threads} | {1e3 * min(self.times):.2f} "
                f"| {1e3 * statistics.median(self.times):.2f} | {cpu} ")


def measure(step: Step, backend: CpuBackend, impls: dict[str, Apply], threads: list[int], rounds: int,
            reference: Callable[[], object]) -> list[Case]:
    """Each implementation at each thread count, and `reference`, once per round, rounds interleaved."""
    cases = []
    for n in threads:
        cases += [Case(label, n, lambda apply=apply: step.run(backend, apply), [], [])
                  for label, apply in impls.items()]
        cases.append(Case("reference", n, reference, [], []))
    saved = torch.get_num_threads()
    try:
        for case in cases:  # warm-up: weight tables, oneDNN, first touches
            case.run()
        for case in cases:
            case.times.clear()
            case.cpu.clear()
        for _ in range(rounds):
            for case in cases:
                case.run()
    finally:
        torch.set_num_threads(saved)
    return cases


HEAD = "| ISA level | threads | best ms | median ms | best thread CPU ms |"


def decode_table(step: Step, cases: list[Case]) -> list[str]:
    nbytes = step.weight_bytes + step.activation_bytes
    copy = {c.threads: 2 * nbytes / c.best / 1e9 for c in cases if c.label == "reference"}
    lines = [HEAD + " GB/s | copy GB/s, same rounds | of copy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        if c.label != "reference":
            gbs = nbytes / c.best / 1e9
            lines.append(f"{c.cells()}| {gbs:.1f} | {copy[c.threads]:.1f} | **{gbs / copy[c.threads]:.2f}** |")
    return lines


def prefill_table(step: Step, cases: list[Case], gemm: dict[int, float]) -> list[str]:
    lines = [HEAD + " GFLOP/s | torch.mm GFLOP/s, same rounds | of mm |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        if c.label != "reference":
            gflops = step.flops / c.best / 1e9
            lines.append(f"{c.cells()}| {gflops:.1f} | {gemm[c.threads]:.0f} | {gflops / gemm[c.threads]:.2f} |")
    return lines


def gemm_rate() -> float:
    """One GEMM's GFLOP/s, on the thread CPU clock when torch runs one thread (as Case.best)."""
    return gemm_gflops(rounds=1, clock=time.thread_time if torch.get_num_threads() == 1 else time.perf_counter)


def report(args, impls: dict[str, Apply], backend: CpuBackend) -> list[str]:
    """Both tables, measured; `impls` by label (the op on each ISA level, or variants to compare)."""
    decode = build_step(args.preset, None, args.adapters, args.rank, 1, backend)
    nbytes = decode.weight_bytes + decode.activation_bytes
    src, dst = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
    src.fill_(1.0)
    dst.fill_(0.0)
    decode_cases = measure(decode, backend, impls, args.threads, args.rounds, lambda: dst.copy_(src))
    prefill = build_step(args.preset, 1, PREFILL_ADAPTERS, args.rank, PREFILL_TOKENS, backend)
    gemm: dict[int, list[float]] = {}
    prefill_cases = measure(prefill, backend, impls, args.threads, args.rounds,
                            lambda: gemm.setdefault(torch.get_num_threads(), []).append(gemm_rate()))
    best_gemm = {n: max(v) for n, v in gemm.items()}
    cfg = SHAPES[args.preset]
    return [f"CPU: {native.cpu_model()} ({os.cpu_count()} cores; {vector_features()}); ISA levels it runs: "
            f"{', '.join(backend.op.isa_levels())}. {quiet_note()}", "",
            f"Decode: `{args.preset}` shapes (hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
            f"{cfg['num_hidden_layers']} layers x 4 fused projections, 7 targets), "
            f"{args.adapters} distinct rank-{args.rank} "
            f"adapters, one token each: {decode.weight_bytes / 1e6:.1f} MB of weights + "
            f"{decode.activation_bytes / 1e6:.1f} MB of activations per step; best and median of {args.rounds} "
            "interleaved rounds.", "", *decode_table(decode, decode_cases), "",
            f"Prefill: one layer's 4 projections, {PREFILL_ADAPTERS} adapters x {PREFILL_TOKENS} tokens, "
            f"{prefill.flops / 1e9:.2f} GFLOP.", "", *prefill_table(prefill, prefill_cases, best_gemm)]


def on_level(op, isa: str) -> Apply:
    return lambda *args: op.apply(*args, isa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="100m")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--isa", nargs="+", help="ISA levels to run (default: every level this CPU runs)")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    op = native.load()
    if op is None:
        raise SystemExit("the fused CPU LoRA op is not built: python -m multilora.lora.native.build")
    backend = CpuBackend(op)
    impls = {isa: on_level(op, native.choose_isa(op, isa)) for isa in (args.isa or op.isa_levels())}
    lines = report(args, impls, backend)
    print("\n".join(lines))
    if args.write:
        replace_section(BENCHMARKS_MD, "cpu_lora_bandwidth", "\n".join(
            ["## The fused CPU LoRA op alone: bandwidth per ISA level", "",
             "Command: `python -m bench.kernels.cpu_lora_bandwidth --write` (its docstring has the setup).", "",
             *lines]))


if __name__ == "__main__":
    main()
