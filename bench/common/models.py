"""The benchmarks' models, cached under .run/bench: a generated Llama (`100m` or `tiny`) with rank-16
adapters on all seven projections, the `tiny` one with up to 1,000 adapters of ranks 8 to 64 (the
adapter benchmarks'), and prompts of an exact token length."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common.paths import BENCH_DIR
from multilora.demo import ALL_LINEAR, CORPUS, make_adapters, make_base_model

SCALE_DIR = BENCH_DIR / "scale"
SCALE_RANKS = (8, 16, 32, 64)  # adapter i of the scale set has rank SCALE_RANKS[i % 4]


def ensure_bench_model(num_adapters: int, preset: str = "100m", root: Path = BENCH_DIR) -> Path:
    """Base model + `num_adapters` adapters gen-0000...; made once, then reused."""
    root = root / preset
    base = root / "base"
    if not (base / "config.json").exists():
        make_base_model(base, preset)
    missing = [i for i in range(num_adapters)
               if not (root / "adapters" / f"gen-{i:04d}" / "adapter_model.safetensors").exists()]
    if missing:
        started = time.monotonic()
        make_adapters(base, [root / "adapters" / f"gen-{i:04d}" for i in missing], 16, 32, False, ALL_LINEAR,
                      seed=1000 + missing[0])
        print(f"made {len(missing)} adapters in {time.monotonic() - started:.0f} s")
    return root


def ensure_scale_adapters(count: int, root: Path = SCALE_DIR) -> Path:
    """The tiny base model and adapters scale-0000... of ranks SCALE_RANKS in turn; made once."""
    base = root / "base"
    if not (base / "config.json").exists():
        make_base_model(base, "tiny")
    for rank in SCALE_RANKS:
        ids = [i for i in range(count) if SCALE_RANKS[i % len(SCALE_RANKS)] == rank
               and not (root / "adapters" / f"scale-{i:04d}" / "adapter_model.safetensors").exists()]
        if ids:
            make_adapters(base, [root / "adapters" / f"scale-{i:04d}" for i in ids], rank, 2 * rank, False,
                          ALL_LINEAR, seed=5000 + ids[0])
    return root


def scale_adapter_ids(count: int) -> list[str]:
    return [f"scale-{i:04d}" for i in range(count)]


def full_vocab_base(root: Path) -> Path:
    """root/base with a tokenizer that spells every id of the model's vocabulary; made once.

    The generated tokenizer learns only ~600 tokens of the model's 8192 ids, so ~93% of what the
    random model generates decodes to nothing, and a stream sends ~5 responses per 64 tokens. A
    real model's tokens are text, one streamed piece each: the added tokens (" w1234") make the
    served benchmarks send what a real model would. Weights are linked, not copied; the folder is
    named base too, as the adapters' base_model_name_or_path says."""
    source, out = root / "base", root / "full-vocab" / "base"
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab_size = json.loads((source / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f" w{i}" for i in range(len(tokenizer), vocab_size)])
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(Path("..", "..", "base", name))
    tokenizer.save_pretrained(out)
    return out


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
