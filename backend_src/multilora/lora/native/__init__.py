"""The fused CPU LoRA op (lora_cpu.cpp), built ahead of time by `make install`, loaded here.

`make install` runs `python -m multilora.lora.native.build`, which compiles the op with torch's
cpp_extension into build/ next to this file. The library's name carries a digest of the source,
the compile flags and the torch version, so a library built from other sources or for another
torch is never loaded: the engine then runs the PyTorch path (lora/backends/torch.py) and says so
once. Nothing is compiled here: a server never waits for a compiler.

The op holds its loop compiled for three ISA levels and runs the one each call names: `choose_isa`
picks the best this CPU has, or the one the environment variable MULTILORA_CPU_ISA forces (so a
machine with AVX-512 also measures and tests the AVX2 and baseline paths); a level the CPU lacks
is refused at engine start.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from ...errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
BUILD_DIR = Path(__file__).with_name("build")
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast")  # fp-contract: FMA in ISO C++ mode too
LDFLAGS = ("-fopenmp",)  # libgomp.so.1: the one torch has already loaded, so one OpenMP pool
ISA_ENV = "MULTILORA_CPU_ISA"
# The op's ISA levels, best first, and what each needs of the CPU (lora_cpu.cpp, "ISA levels").
ISA_LEVELS = {"v4": "AVX-512F + FMA", "v3": "AVX2 + FMA", "baseline": "SSE2"}


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


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo says it ("unknown CPU" elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def choose_isa(op: ModuleType, requested: str | None = None) -> str:
    """The ISA level the op runs: `requested` (default: $MULTILORA_CPU_ISA; empty or "auto": the
    best this CPU runs). A level the CPU lacks, or a name that is no level, is a ConfigError: a
    benchmark or test that asked for a path must not silently measure another."""
    runs = list(op.isa_levels())  # best first
    want = (os.environ.get(ISA_ENV, "") if requested is None else requested).strip().lower() or "auto"
    if want == "auto":
        return runs[0]
    if want not in ISA_LEVELS:
        raise ConfigError(f"{ISA_ENV}={want!r} is not an ISA level of the fused CPU LoRA op; use auto or one of "
                          + ", ".join(f"{name} ({needs})" for name, needs in ISA_LEVELS.items()))
    if want not in runs:
        raise ConfigError(f"{ISA_ENV}={want} asks for the {ISA_LEVELS[want]} path of the fused CPU LoRA op, which "
                          f"this CPU ({cpu_model()}) lacks; it runs {', '.join(runs)}. Unset {ISA_ENV} for the best.")
    return want
