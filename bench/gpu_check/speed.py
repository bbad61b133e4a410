"""GPU check stages: engine speed on an 8-layer Llama-3-8B-shaped bf16 model with 32 adapters.

Tokens/s base-only, with our kernels (cuda_kernels=on, and the CUDA graphs the engine captures) and
on the PyTorch path (off), and one decode step's wall vs GPU time, through the engine's public API
and its log only. The model is written once into the work folder by bench/gpu_check/speed_model.py,
on the GPU. A dry run runs the same code on a 2-layer tiny shape on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common.models import adapter_ids, exact_prompts
from bench.gpu_check.engine import outputs_text
from bench.gpu_check.harness import GRAPHS_LOGGER, Context, floors_status, log_messages
from bench.gpu_check.speed_model import write_adapters, write_base
from multilora.config import EngineConfig
from multilora.cuda import module as loader
from multilora.demo import ALL_LINEAR
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest


@dataclass(frozen=True)
class SpeedShape:
    model: dict = field(default_factory=dict)  # the Llama config's shape
    adapters: int = 32
    requests: int = 64
    prompt_tokens: int = 128
    output_tokens: int = 64
    max_batched: int = 2048
    kv_cache: str = "8GiB"


LLAMA3_8B_SHAPED = SpeedShape(dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   rope_theta=500000.0))
SMALL = SpeedShape(dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=1024), adapters=4, requests=8, prompt_tokens=16,
                   output_tokens=8, max_batched=64, kv_cache="64MiB")


def shape_of(ctx: Context) -> SpeedShape:
    return SMALL if ctx.dry else LLAMA3_8B_SHAPED


def model_dir(ctx: Context) -> Path:
    return ctx.work / ("small-shaped" if ctx.dry else "llama3-8b-shaped")


def run_model(ctx: Context) -> dict:
    """The random 8B-shaped bf16 model and its rank-16 adapters, drawn on the device, written once
    into the work folder (READY marks a complete one)."""
    shape, root = shape_of(ctx), model_dir(ctx)
    if (root / "READY").exists():
        return {"status": "PASS", "summary": f"reused {root}"}
    started = time.monotonic()
    base = write_base(root / "base", shape.model, ctx.device)
    made = time.monotonic()
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
    ctx.report({"status": "FAIL", "partial": True, "summary": f"base {size:.1f} GiB in {made - started:.0f} s"})
    write_adapters(base, [root / "adapters" / a for a in adapter_ids(shape.adapters)], 16, 32, ALL_LINEAR,
                   ctx.device, seed=1000)
    (root / "READY").write_text("complete\n")
    return {"status": "PASS", "summary": f"base {size:.1f} GiB in {made - started:.0f} s, {shape.adapters} adapters "
                                         f"in {time.monotonic() - made:.0f} s ({root})"}


def speed_engine(ctx: Context, cuda_kernels: str) -> tuple[LLMEngine, list[str]]:
    """The engine, and what it said about CUDA graphs at start."""
    shape, root = shape_of(ctx), model_dir(ctx)
    cuda = ctx.device.startswith("cuda")
    with log_messages(GRAPHS_LOGGER) as messages:
        return _engine(ctx, shape, root, cuda, cuda_kernels), messages


def _engine(ctx: Context, shape: SpeedShape, root: Path, cuda: bool, cuda_kernels: str) -> LLMEngine:
    return LLMEngine(EngineConfig(
        base_model=str(root / "base"), adapter_dir=str(root / "adapters"), device=ctx.device,
        dtype="bfloat16" if cuda else "float32", cuda_kernels=cuda_kernels, max_num_seqs=shape.requests,
        max_num_batched_tokens=shape.max_batched, max_model_len=shape.prompt_tokens + shape.output_tokens,
        max_loras=shape.adapters, max_cpu_loras=shape.adapters, max_lora_rank=16, kv_cache_memory=shape.kv_cache,
        adapter_load_timeout_s=max(ctx.left_s(), 10)))


def _speed_requests(ctx: Context, prompts: list[str], with_adapters: bool, tokens: int, prefix: str):
    ids = adapter_ids(shape_of(ctx).adapters)
    return [GenerationRequest(f"{prefix}{i}", p, SamplingParams(max_tokens=tokens, ignore_eos=True),
                              ids[i % len(ids)] if with_adapters else None) for i, p in enumerate(prompts)]


def _timed(engine: LLMEngine, requests, tokens: int) -> float:
    started = time.perf_counter()
    outputs_text(engine.generate(requests), tokens)
    return time.perf_counter() - started


def _warm(ctx: Context, engine: LLMEngine, prompts: list[str]) -> None:
    """Every adapter loaded into a slot and every kernel/JIT path touched once before timing."""
    ids = adapter_ids(shape_of(ctx).adapters)
    engine.generate([GenerationRequest(f"w{i}", prompts[i % len(prompts)], SamplingParams(max_tokens=2), a)
                     for i, a in enumerate([None, *ids])])


def _gpu_busy_s(run) -> float | None:
    """Seconds of GPU kernel and copy time while `run()` runs (torch.profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
                   for e in prof.key_averages())
    return total_us / 1e6 or None


def _speed(ctx: Context, cuda_kernels: str, base_too: bool) -> dict:
    shape = shape_of(ctx)
    engine, said = speed_engine(ctx, cuda_kernels)
    prompts = exact_prompts(engine.tokenizer, shape.requests, shape.prompt_tokens)
    _warm(ctx, engine, prompts)
    out_total = shape.requests * shape.output_tokens
    facts: dict = {}
    lines = [f"{shape.requests} requests of {shape.prompt_tokens} + {shape.output_tokens} tokens, "
             f"{shape.adapters} rank-16 adapters on all seven projections, cuda_kernels={cuda_kernels}; "
             f"{'; '.join(said) or 'no CUDA graphs'}"]
    runs = [("base", False), ("lora", True)] if base_too else [("lora", True)]
    for name, with_adapters in runs:
        seconds = _timed(engine, _speed_requests(ctx, prompts, with_adapters, shape.output_tokens, name),
                         shape.output_tokens)
        facts[f"{name}_tokens_per_s"] = out_total / seconds
        facts[f"{name}_s"] = seconds
        lines.append(f"- {'base model only' if name == 'base' else f'{shape.adapters} distinct adapters'}: "
                     f"{out_total / seconds:.0f} output tokens/s ({seconds:.2f} s)")
        ctx.report({"status": "FAIL", "partial": True, "summary": "measuring", "facts": facts,
                    "details": "\n".join(lines)})
    return {"engine": engine, "prompts": prompts, "facts": facts, "lines": lines}


def _decode_step(ctx: Context, engine: LLMEngine, prompts: list[str], full_s: float, facts: dict) -> list[str]:
    """Wall and GPU time of one decode step: (a whole run - a prefill-only run) / decode steps (into
    `facts` too, for the report: the host stage's figures stand next to them)."""
    shape = shape_of(ctx)
    steps = shape.output_tokens - 1
    full = _speed_requests(ctx, prompts, True, shape.output_tokens, "f")
    prefill = _speed_requests(ctx, prompts, True, 1, "p")
    wall = (full_s - _timed(engine, prefill, 1)) / steps
    facts["decode_wall_ms"] = wall * 1e3
    lines = [f"- decode step, {shape.requests} rows with adapters: {wall * 1e3:.1f} ms wall"]
    if ctx.device.startswith("cuda"):
        busy_full = _gpu_busy_s(lambda: engine.generate(full))
        busy_prefill = _gpu_busy_s(lambda: engine.generate(prefill))
        if busy_full and busy_prefill:
            gpu = (busy_full - busy_prefill) / steps
            facts["decode_gpu_ms"] = gpu * 1e3
            lines[-1] += f", {gpu * 1e3:.1f} ms GPU busy ({gpu / wall:.0%}); the rest is host time"
    return lines


def run_speed_on(ctx: Context) -> dict:
    """Base-only and 32-adapter tokens/s with our kernels, and one decode step's CPU vs GPU time."""
    run = _speed(ctx, "on", base_too=True)
    facts, lines = run["facts"], run["lines"]
    ratio = facts["lora_tokens_per_s"] / facts["base_tokens_per_s"]
    facts["adapter_ratio"] = ratio
    lines += _decode_step(ctx, run["engine"], run["prompts"], facts["lora_s"], facts)
    loads = loader.loaded()
    used = any(not v.startswith("failed") for v in loads.values())
    cuda = ctx.device.startswith("cuda")
    if cuda:
        lines.append(f"- kernels loaded by the engine: {loads or 'none'}")
    floors = [{"name": f"{shape_of(ctx).adapters} distinct adapters vs base-only tokens/s", "measured": f"{ratio:.2f}x",
               "required": ">= 0.80x", "ok": ratio >= 0.8}]
    ok = floors_status(floors, ctx) == "PASS" and (used or not cuda)
    return {"status": "PASS" if ok else "FAIL", "facts": facts, "floors": floors, "details": "\n".join(lines),
            "summary": f"base {facts['base_tokens_per_s']:.0f} tok/s, {shape_of(ctx).adapters} adapters "
                       f"{facts['lora_tokens_per_s']:.0f} tok/s ({ratio:.2f}x)"
                       + ("" if used or not cuda else "; cuda_kernels=on but the engine never loaded the kernels")}


def run_speed_off(ctx: Context) -> dict:
    """32-adapter tokens/s on the PyTorch path (cuda_kernels=off): the engine must not load kernels."""
    run = _speed(ctx, "off", base_too=False)
    facts, lines = run["facts"], run["lines"]
    loads = loader.loaded()
    if loads:
        lines.append(f"- cuda_kernels=off, yet the engine loaded the kernels: {loads}")
    return {"status": "FAIL" if loads else "PASS", "facts": facts, "details": "\n".join(lines),
            "summary": f"{shape_of(ctx).adapters} adapters {facts['lora_tokens_per_s']:.0f} tok/s"
                       + ("; cuda_kernels=off was not honoured" if loads else "")}
