"""GPU check stages about the engine: correctness on CUDA, and speed on a Llama-3-8B-shaped model.

Only the engine's public API is used (EngineConfig, LLMEngine.generate / start / add_request /
shutdown, GenerationRequest, SamplingParams, the demo builders), so these stages do not depend on
how the engine is built inside. `--device cpu --small` runs the same code on tiny shapes (tests).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_model import adapter_ids, exact_prompts
from gpu_check import Context
from multilora.config import EngineConfig
from multilora.demo import ALL_LINEAR, CORPUS, DEMO_ADAPTERS, make_adapters, make_base_model, make_demo
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest
from multilora.kernels import loader

TOKENS = 16  # generated per request in the correctness checks (6 in the CPU dry run)
BF16_AGREEMENT = 0.5  # mean fraction of each PEFT bf16 text that ours reproduces before diverging


@dataclass(frozen=True)
class SpeedShape:
    model: dict = field(default_factory=dict)  # config overrides for make_base_model
    adapters: int = 32
    requests: int = 64
    prompt_tokens: int = 128
    output_tokens: int = 64
    max_batched: int = 2048
    kv_cache: str = "8GiB"


LLAMA3_8B_SHAPED = SpeedShape(dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   rope_theta=500000.0))
SMALL = SpeedShape(dict(num_hidden_layers=2), adapters=4, requests=8, prompt_tokens=16, output_tokens=8,
                   max_batched=64, kv_cache="64MiB")


def _outputs_text(outputs: dict, expected_tokens: int | None = None) -> dict[str, str]:
    """Final texts by request id; a request that errored or stopped short is a failure here."""
    texts = {}
    for rid, outs in outputs.items():
        final = outs[-1]
        if final.error is not None or (expected_tokens and final.completion_tokens != expected_tokens):
            raise RuntimeError(f"request {rid} ended {final.finish_reason}: {final.error}, "
                               f"{final.completion_tokens} tokens")
        texts[rid] = final.text
    return texts


def _greedy_rows(count: int) -> list[tuple[str, str | None]]:
    """(prompt, adapter) pairs cycling over the base model and the demo's four adapters."""
    prompts = [line for line in CORPUS.splitlines() if line][:5]
    adapters = [None, *(a[0] for a in DEMO_ADAPTERS)]
    return [(prompts[i % len(prompts)], adapters[i % len(adapters)]) for i in range(count)]


def _requests(rows, tokens: int, prefix: str = "g") -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}{i}", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), adapter)
            for i, (prompt, adapter) in enumerate(rows)]


def peft_texts(demo: Path, rows, dtype: torch.dtype, device: str, tokens: int) -> list[str]:
    """transformers + peft greedy texts for each (prompt, adapter), one row at a time, the row's
    adapter active (PEFT's mixed-batch forward loops over every adapter per layer: far slower)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(demo / "base")
    model = None
    for adapter_id, *_ in DEMO_ADAPTERS:
        path = demo / "adapters" / adapter_id
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=adapter_id)
        else:
            model.load_adapter(path, adapter_name=adapter_id)
    model = model.to(device=device, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(demo / "base")
    texts = []
    for prompt, adapter in rows:
        ids = torch.tensor([tok.encode(prompt)], device=device)
        if adapter is not None:
            model.set_adapter(adapter)
        with torch.no_grad(), model.disable_adapter() if adapter is None else contextlib.nullcontext():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id, eos_token_id=None)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts


def demo_engine(demo: Path, device: str, dtype: str) -> LLMEngine:
    return LLMEngine(EngineConfig(base_model=str(demo / "base"), adapter_dir=str(demo / "adapters"), device=device,
                                  dtype=dtype, kv_cache_memory="64MiB",
                                  lora_kernels="on" if device.startswith("cuda") else "auto"))


def _prefix_agreement(ours: str, ref: str) -> float:
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return same / max(len(ref), 1)


def seeded_check(engine: LLMEngine, rows, tokens: int) -> tuple[bool, str]:
    """One seeded request alone and in two other batch mixes gives one text; another seed, another."""
    def sampled(rid: str, seed: int) -> GenerationRequest:
        return GenerationRequest(rid, rows[2][0], SamplingParams(max_tokens=tokens, temperature=0.9, top_p=0.95,
                                                                 seed=seed, ignore_eos=True), "chat")
    mixes = [[], _requests(rows[:5], tokens, "a"),
             [GenerationRequest(f"b{i}", p, SamplingParams(max_tokens=tokens // 2, temperature=1.0, seed=i), a)
              for i, (p, a) in enumerate(rows[3:])]]
    texts = [_outputs_text(engine.generate([sampled("seeded", 1234), *mix]))["seeded"] for mix in mixes]
    other = _outputs_text(engine.generate([sampled("other", 1235)]))["other"]
    ok = len(set(texts)) == 1 and other != texts[0]
    return ok, (f"seed 1234 alone and in 2 other batch mixes: {len(set(texts))} distinct text(s); "
                f"seed 1235 differs: {other != texts[0]}")


def threaded_check(engine: LLMEngine, rows, tokens: int, expected: dict[str, str],
                   timeout_s: float) -> tuple[bool, str]:
    """start(), requests added from several threads at once; the same greedy texts as generate()."""
    finals: dict[str, object] = {}
    all_done = threading.Event()
    errors: list[BaseException] = []

    def on_output(out) -> None:
        if out.finished:
            finals[out.request_id] = out
            if len(finals) == len(rows):
                all_done.set()

    def add(request) -> None:
        try:
            engine.add_request(request, on_output)
        except BaseException as exc:  # reported below
            errors.append(exc)

    engine.start()
    try:
        threads = [threading.Thread(target=add, args=(r,)) for r in _requests(rows, tokens)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished = all_done.wait(timeout_s)
    finally:
        engine.shutdown()
    texts = {rid: out.text for rid, out in finals.items() if out.error is None}
    same = sum(texts.get(rid) == text for rid, text in expected.items())
    ok = finished and not errors and same == len(expected)
    return ok, (f"{len(finals)}/{len(rows)} ended, {same}/{len(expected)} texts as generate()"
                + (f"; add_request raised {errors}" if errors else ""))


def _mismatch(ours: dict[str, str], refs: list[str]) -> str:
    """The first row whose text differs from the reference, both texts shown (empty if none)."""
    for i, ref in enumerate(refs):
        if ours[f"g{i}"] != ref:
            return f"; first difference, row {i}: ours {ours[f'g{i}'][:60]!r} vs PEFT {ref[:60]!r}"
    return ""


def run_engine(ctx: Context) -> dict:
    """fp32 PEFT equality, seeded sampling across batch mixes, the threaded engine, bf16 agreement;
    each check reports on its own, so one failure does not hide the others."""
    demo = ctx.work / "demo"
    if not (demo / "READY").exists():
        make_demo(demo)
    rows, tokens = _greedy_rows(4 if ctx.small else 8), 6 if ctx.small else TOKENS
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, run) -> None:
        try:
            ok, text = run()
        except Exception as exc:  # this check failed; the next ones still run
            ok, text = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        checks.append((name, ok, text))
        ctx.report({"status": "FAIL", "partial": True, "summary": "checking", "details": _checks_md(checks)})

    def fp32_then_seeded_and_threaded() -> tuple[bool, str]:
        ref = peft_texts(demo, rows, torch.float32, ctx.device, tokens)
        engine = demo_engine(demo, ctx.device, "float32")
        ours = _outputs_text(engine.generate(_requests(rows, tokens)), tokens)
        check("seeded sampling across batch mixes", lambda: seeded_check(engine, rows, tokens))
        check("threaded engine (start, add_request)",
              lambda: threaded_check(engine, rows, tokens, ours, min(60.0, ctx.left_s() / 3)))
        same = sum(ours[f"g{i}"] == text for i, text in enumerate(ref))
        return same == len(rows), f"{same}/{len(rows)} rows identical" + _mismatch(ours, ref)

    def bf16() -> tuple[bool, str]:
        ref = peft_texts(demo, rows, torch.bfloat16, ctx.device, tokens)
        ours = _outputs_text(demo_engine(demo, ctx.device, "bfloat16").generate(_requests(rows, tokens)), tokens)
        agreement = [_prefix_agreement(ours[f"g{i}"], text) for i, text in enumerate(ref)]
        mean = sum(agreement) / len(agreement)
        return mean >= BF16_AGREEMENT, (f"{sum(a == 1.0 for a in agreement)}/{len(rows)} rows identical, mean "
                                        f"common prefix {mean:.0%} (required >= {BF16_AGREEMENT:.0%})")

    check("fp32 greedy texts = PEFT fp32", fp32_then_seeded_and_threaded)
    check("bf16 greedy agreement with PEFT bf16", bf16)
    failed = [name for name, ok, _ in checks if not ok]
    return {"status": "FAIL" if failed else "PASS", "details": _checks_md(checks),
            "summary": f"{len(checks) - len(failed)}/{len(checks)} checks pass"
                       + (f"; failed: {', '.join(failed)}" if failed else "")}


def _checks_md(checks) -> str:
    return "\n".join(f"- {'PASS' if ok else 'FAIL'} {name}: {text}" for name, ok, text in checks)


def shape_of(ctx: Context) -> SpeedShape:
    return SMALL if ctx.small else LLAMA3_8B_SHAPED


def model_dir(ctx: Context) -> Path:
    return ctx.work / ("small-shaped" if ctx.small else "llama3-8b-shaped")


def run_model(ctx: Context) -> dict:
    """The random 8B-shaped bf16-served model and its rank-16 adapters, built once into the work dir."""
    shape, root = shape_of(ctx), model_dir(ctx)
    if (root / "READY").exists():
        return {"status": "PASS", "summary": f"reused {root}"}
    started = time.monotonic()
    base = make_base_model(root / "base", "tiny", **shape.model)
    made = time.monotonic()
    make_adapters(base, [root / "adapters" / a for a in adapter_ids(shape.adapters)], 16, 32, False, ALL_LINEAR,
                  seed=1000)
    (root / "READY").write_text("complete\n")
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / 2**30
    return {"status": "PASS", "summary": f"base {size:.1f} GiB in {made - started:.0f} s, {shape.adapters} adapters "
                                         f"in {time.monotonic() - made:.0f} s ({root})"}


def speed_engine(ctx: Context, lora_kernels: str) -> LLMEngine:
    shape, root = shape_of(ctx), model_dir(ctx)
    cuda = ctx.device.startswith("cuda")
    return LLMEngine(EngineConfig(
        base_model=str(root / "base"), adapter_dir=str(root / "adapters"), device=ctx.device,
        dtype="bfloat16" if cuda else "float32", lora_kernels=lora_kernels, max_num_seqs=shape.requests,
        max_num_batched_tokens=shape.max_batched, max_model_len=shape.prompt_tokens + shape.output_tokens,
        max_loras=shape.adapters, max_cpu_loras=shape.adapters, max_lora_rank=16, kv_cache_memory=shape.kv_cache,
        adapter_load_timeout_s=max(ctx.left_s(), 10)))


def _speed_requests(ctx: Context, prompts: list[str], with_adapters: bool, tokens: int, prefix: str):
    ids = adapter_ids(shape_of(ctx).adapters)
    return [GenerationRequest(f"{prefix}{i}", p, SamplingParams(max_tokens=tokens, ignore_eos=True),
                              ids[i % len(ids)] if with_adapters else None) for i, p in enumerate(prompts)]


def _timed(engine: LLMEngine, requests, tokens: int) -> float:
    started = time.perf_counter()
    _outputs_text(engine.generate(requests), tokens)
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


def _speed(ctx: Context, lora_kernels: str, base_too: bool) -> dict:
    shape = shape_of(ctx)
    engine = speed_engine(ctx, lora_kernels)
    prompts = exact_prompts(engine.tokenizer, shape.requests, shape.prompt_tokens)
    _warm(ctx, engine, prompts)
    out_total = shape.requests * shape.output_tokens
    facts: dict = {}
    lines = [f"{shape.requests} requests of {shape.prompt_tokens} + {shape.output_tokens} tokens, "
             f"{shape.adapters} rank-16 adapters on all seven projections, lora_kernels={lora_kernels}"]
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


def _decode_step(ctx: Context, engine: LLMEngine, prompts: list[str], full_s: float) -> list[str]:
    """Wall and GPU time of one decode step: (a whole run - a prefill-only run) / decode steps."""
    shape = shape_of(ctx)
    steps = shape.output_tokens - 1
    full = _speed_requests(ctx, prompts, True, shape.output_tokens, "f")
    prefill = _speed_requests(ctx, prompts, True, 1, "p")
    wall = (full_s - _timed(engine, prefill, 1)) / steps
    lines = [f"- decode step, {shape.requests} rows with adapters: {wall * 1e3:.1f} ms wall"]
    if ctx.device.startswith("cuda"):
        busy_full = _gpu_busy_s(lambda: engine.generate(full))
        busy_prefill = _gpu_busy_s(lambda: engine.generate(prefill))
        if busy_full and busy_prefill:
            gpu = (busy_full - busy_prefill) / steps
            lines[-1] += f", {gpu * 1e3:.1f} ms GPU busy ({gpu / wall:.0%}); the rest is host time"
    return lines


def run_speed_on(ctx: Context) -> dict:
    """Base-only and 32-adapter tokens/s with our kernels, and one decode step's CPU vs GPU time."""
    run = _speed(ctx, "on", base_too=True)
    facts, lines = run["facts"], run["lines"]
    ratio = facts["lora_tokens_per_s"] / facts["base_tokens_per_s"]
    facts["adapter_ratio"] = ratio
    lines += _decode_step(ctx, run["engine"], run["prompts"], facts["lora_s"])
    loads = loader.loaded()
    used = any(not v.startswith("failed") for v in loads.values())
    cuda = ctx.device.startswith("cuda")
    if cuda:
        lines.append(f"- kernels loaded by the engine: {loads or 'none'}")
    floors = [{"name": f"{shape_of(ctx).adapters} distinct adapters vs base-only tokens/s", "measured": f"{ratio:.2f}x",
               "required": ">= 0.80x", "ok": ratio >= 0.8}]
    ok = floors[0]["ok"] and (used or not cuda)
    return {"status": "PASS" if ok else "FAIL", "facts": facts, "floors": floors, "details": "\n".join(lines),
            "summary": f"base {facts['base_tokens_per_s']:.0f} tok/s, {shape_of(ctx).adapters} adapters "
                       f"{facts['lora_tokens_per_s']:.0f} tok/s ({ratio:.2f}x)"
                       + ("" if used or not cuda else "; lora_kernels=on but the engine never loaded the kernels")}


def run_speed_off(ctx: Context) -> dict:
    """32-adapter tokens/s on the PyTorch path (lora_kernels=off): the engine must not load kernels."""
    run = _speed(ctx, "off", base_too=False)
    facts, lines = run["facts"], run["lines"]
    loads = loader.loaded()
    if loads:
        lines.append(f"- lora_kernels=off, yet the engine loaded the kernels: {loads}")
    return {"status": "FAIL" if loads else "PASS", "facts": facts, "details": "\n".join(lines),
            "summary": f"{shape_of(ctx).adapters} adapters {facts['lora_tokens_per_s']:.0f} tok/s"
                       + ("; lora_kernels=off was not honoured" if loads else "")}
