"""The benchmarks' model: a generated ~100M-parameter Llama and rank-16 adapters on all seven
projections, cached under .run/bench, plus prompts of an exact token length."""
from __future__ import annotations

import time
from pathlib import Path

from multilora.demo import ALL_LINEAR, CORPUS, make_adapters, make_base_model

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".run" / "bench"


def ensure_bench_model(num_adapters: int, preset: str = "100m", root: Path = BENCH_DIR) -> Path:
    """Base model + `num_adapters` adapters gen-0000...; made once, then reused."""
    root = root / preset
    base = root / "base"
    if not (base / "config.json").exists():
        make_base_model(base, preset)
    missing = [i for i in range(num_adapters) if not (root / "adapters" / f"gen-{i:04d}" / "adapter_model.safetensors").exists()]
    if missing:
        started = time.monotonic()
        make_adapters(base, [root / "adapters" / f"gen-{i:04d}" for i in missing], 16, 32, False, ALL_LINEAR,
                      seed=1000 + missing[0])
        print(f"made {len(missing)} adapters in {time.monotonic() - started:.0f} s")
    return root


def adapter_ids(count: int) -> list[str]:
    return [f"gen-{i:04d}" for i in range(count)]


def exact_prompts(tokenizer, count: int, length: int) -> list[str]:
    """`count` different prompts that each encode to exactly `length` tokens (BOS included)."""
    ids = tokenizer.encode(CORPUS * 200, add_special_tokens=False)
    prompts = []
    offset = 0
    while len(prompts) < count:
        text = tokenizer.decode(ids[offset:offset + length - 1])
        if len(tokenizer.encode(text)) == length:
            prompts.append(text)
        offset += 37
    return prompts
