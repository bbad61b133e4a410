"""The fused CPU LoRA op (lora_cpu.cpp), built ahead of time by `make install`, loaded here.

`make install` runs `python -m multilora.lora.native.build`, which compiles the op with torch's
cpp_extension into build/ next to this file. The library's name carries a digest of the source,
the compile flags and the torch version, so a library built from other sources or for another
torch is never loaded: the engine then runs the PyTorch path (lora/backends/torch.py) and says so
once. Nothing is compiled here: a server never waits for a compiler.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
BUILD_DIR = Path(__file__).with_name("build")
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast")  # fp-contract: FMA in ISO C++ mode too
LDFLAGS = ("-fopenmp",)  # libgomp.so.1: the one torch has already loaded, so one OpenMP pool


def module_name() -> str:
    """lora_cpu_<digest of the source, flags and torch version>: what build() writes, load() reads."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((*CFLAGS, *LDFLAGS, torch.__version__)).encode())
    return f"lora_cpu_{digest.hexdigest()[:16]}"


@cache
def load() -> ModuleType | None:
    """The built op, or None (logged once, with why and what to do) when it is not there."""
    name = module_name()
    path = BUILD_DIR / f"{name}.so"
    if not path.exists():
        log.warning("fused CPU LoRA op not built for these sources and torch %s (no %s); LoRA runs on the "
                    "PyTorch path. Build it with `make install` (python -m multilora.lora.native.build)",
                    torch.__version__, path)
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken build must not stop the server: the PyTorch path serves
        log.warning("fused CPU LoRA op at %s does not load (%s); LoRA runs on the PyTorch path", path, exc)
        return None
    log.info("fused CPU LoRA op loaded (%s, %d threads)", path.name, torch.get_num_threads())
    return module
