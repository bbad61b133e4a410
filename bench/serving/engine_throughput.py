"""Output tokens/s of the engine in-process with K adapters, against the base model and PEFT.

    python -m bench.serving.engine_throughput            # (make bench) about 15 min on 2 cores, writes docs/
    python -m bench.serving.engine_throughput --quick    # tiny model, few requests: checks it works (prints only)

Workload: 32 requests, 128 prompt tokens, 64 new tokens (ignore_eos), adapters drawn uniformly
from K of the generated rank-16 all-linear adapters. Systems, measured in the same process:
(1) our engine, no adapter; (2) our engine, K adapters; (3) transformers + peft, one request at a
time with set_adapter; (4) peft mixed-adapter `generate(adapter_names=...)`, static batch of 32;
(5) the same workload as (2) at K = 32 through a real tritonserver over gRPC streaming.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field

import torch

from bench.common.cpu import host_facts
from bench.common.models import adapter_ids, ensure_bench_model, exact_prompts
from bench.common.reports import percentile, write_report
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

KS = (1, 8, 32, 128)


@dataclass
class Setup:
    preset: str = "100m"
    requests: int = 32
    prompt_len: int = 128
    new_tokens: int = 64
    peft_sequential_requests: int = 8  # one at a time: tokens/s does not depend on how many
    repeats: int = 5
    ks: tuple[int, ...] = KS


@dataclass
class LoraStepMeter:
    """Time spent in the LoRA op and the bytes it must read (distinct adapters' weights + activations)."""

    seconds: float = 0.0
    bytes: int = 0
    active: bool = False

    def attach(self, context) -> None:
        """Every LoRA layer of the engine calls its backend's apply through the context: meter that."""
        self.context, self.original = context, context.backend.apply
        context.backend.apply = self

    def __call__(self, y, x, targets, plan):
        if not self.active:
            return self.original(y, x, targets, plan)
        started = time.perf_counter()
        self.original(y, x, targets, plan)
        self.seconds += time.perf_counter() - started
        self.bytes += lora_bytes(x, targets, self.context.batch)


def lora_bytes(x, targets, batch) -> int:
    """What one call must read and write: each distinct adapter's A and B once per target, the
    rows of x once, and the targets' output columns of those rows twice (read, write)."""
    slots = {seg.slot for seg in batch.segments}
    rows = sum(seg.end - seg.start for seg in batch.segments)
    total = rows * x.shape[1] * x.element_size()
    for target in targets.targets:
        for slot in slots:
            a, b = target.table.a[slot], target.table.b[slot]
            if a is not None:
                total += a.nbytes + b.nbytes
        total += 2 * rows * (target.end - target.start) * x.element_size()
    return total


@dataclass
class Run:
    tokens_per_s: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def engine_run(engine: LLMEngine, prompts: list[str], adapters: list[str | None], new_tokens: int) -> Run:
    requests = [GenerationRequest(str(i), p, SamplingParams(max_tokens=new_tokens, ignore_eos=True), a)
                for i, (p, a) in enumerate(zip(prompts, adapters))]
    started = time.perf_counter()
    outputs = engine.generate(requests)
    elapsed = time.perf_counter() - started
    finals = [o[-1] for o in outputs.values()]
    assert all(f.error is None and f.completion_tokens == new_tokens for f in finals)
    run = Run(sum(f.completion_tokens for f in finals) / elapsed)
    for f in finals:
        run.ttft.append(f.token_times[0] - f.arrival_time)
        run.itl += [b - a for a, b in zip(f.token_times, f.token_times[1:])]
    return run


def peft_model(root, adapters: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = None
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    for adapter in sorted(set(adapters)):
        if model is None:
            model = PeftModel.from_pretrained(base, root / "adapters" / adapter, adapter_name=adapter)
        else:
            model.load_adapter(root / "adapters" / adapter, adapter_name=adapter)
    return model.eval()


def peft_sequential(model, tokenizer, prompts, adapters, new_tokens) -> float:
    started, generated = time.perf_counter(), 0
    for prompt, adapter in zip(prompts, adapters):
        model.set_adapter(adapter)
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - started)


def peft_mixed_batch(model, tokenizer, prompts, adapters, new_tokens) -> float:
    ids = torch.tensor([tokenizer.encode(p) for p in prompts])  # equal lengths: no padding
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=list(adapters),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run")
    parser.add_argument("--no-server", action="store_true", help="skip the tritonserver measurement")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/ (--quick never does)")
    parser.add_argument("--k", type=int, action="append", choices=KS,
                        help="measure only this K (repeatable); implies --no-write")
    args = parser.parse_args()
    setup = Setup(preset="tiny", requests=8, prompt_len=32, new_tokens=8, peft_sequential_requests=2,
                  repeats=1, ks=(1, 8)) if args.quick else Setup(ks=tuple(args.k or KS))
    root = ensure_bench_model(max(setup.ks), setup.preset)
    meter = LoraStepMeter()
    config = EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"), kv_cache_memory="2GiB",
                          max_num_seqs=setup.requests, max_loras=max(setup.ks), max_cpu_loras=max(setup.ks))
    engine = LLMEngine(config)
    meter.attach(engine.runner.lora.context)
    prompts = exact_prompts(engine.tokenizer, setup.requests, setup.prompt_len)
    rng = random.Random(0)
    results: dict[int, dict] = {}
    engine_run(engine, prompts, [None] * setup.requests, setup.new_tokens)  # warm-up
    for k in setup.ks:
        ids = adapter_ids(k)
        drawn = [rng.choice(ids) for _ in range(setup.requests)]
        for adapter in set(drawn):
            engine.manage("load", adapter)
        base_runs, lora_runs = [], []
        for _ in range(setup.repeats):  # interleaved, so drift hits both alike
            base_runs.append(engine_run(engine, prompts, [None] * setup.requests, setup.new_tokens))
            lora_runs.append(engine_run(engine, prompts, drawn, setup.new_tokens))
        # The LoRA op's time and bytes in a run of their own: counting bytes costs Python time
        # per call, which must not slow the runs compared above.
        meter.seconds = meter.bytes = 0
        meter.active = True
        metered = engine_run(engine, prompts, drawn, setup.new_tokens)
        meter.active = False
        base = max(base_runs, key=lambda r: r.tokens_per_s)
        lora = max(lora_runs, key=lambda r: r.tokens_per_s)
        model = peft_model(root, drawn)
        n = setup.peft_sequential_requests
        sequential = peft_sequential(model, engine.tokenizer, prompts[:n], drawn[:n], setup.new_tokens)
        mixed = peft_mixed_batch(model, engine.tokenizer, prompts, drawn, setup.new_tokens)
        del model
        results[k] = dict(base=base.tokens_per_s, lora=lora.tokens_per_s, peft_seq=sequential, peft_mixed=mixed,
                          distinct=len(set(drawn)), ttft=lora.ttft, itl=lora.itl,
                          lora_seconds=meter.seconds, lora_bytes=meter.bytes,
                          lora_share=meter.seconds * metered.tokens_per_s / (setup.requests * setup.new_tokens))
        r = results[k]
        print(f"K={k:4d} distinct={r['distinct']:3d} base {r['base']:7.1f} tok/s  lora {r['lora']:7.1f} "
              f"({r['lora'] / r['base']:.3f})  peft-seq {sequential:6.1f} ({r['lora'] / sequential:5.1f}x)  "
              f"peft-mixed {mixed:6.1f} ({r['lora'] / mixed:4.1f}x)  "
              f"ttft p50 {percentile(lora.ttft, 50):.2f}s  itl p50 {1000 * percentile(lora.itl, 50):.0f}ms "
              f"p99 {1000 * percentile(lora.itl, 99):.0f}ms", flush=True)
    backend = engine.runner.lora.context.backend
    facts = host_facts(getattr(backend, "isa", None))  # the CPU, the op's ISA level, copy GB/s, GEMM GFLOP/s
    bandwidth = facts.copy_gbs
    server = None
    if not args.no_server:
        from bench.common.tritonserver import serve_and_measure  # needs tritonclient

        k = 32 if 32 in setup.ks else max(setup.ks)
        drawn = [random.Random(k).choice(adapter_ids(k)) for _ in range(setup.requests)]
        in_process = engine_run(engine, prompts, drawn, setup.new_tokens).tokens_per_s
        engine.shutdown()
        del engine
        served = serve_and_measure(root, config, prompts, drawn, setup.new_tokens)
        server = dict(k=k, in_process=in_process, served=served)
        print(f"tritonserver gRPC streaming K={k}: {served:.1f} tok/s vs in-process {in_process:.1f} "
              f"({served / in_process:.3f})")
    print(facts.line())
    if not (args.no_write or args.quick or args.k):
        write_report(setup, results, bandwidth, server, facts.line())


if __name__ == "__main__":
    main()
