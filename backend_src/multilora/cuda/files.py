"""The kernel files shipped inside the package: the CUDA source and its committed PTX, and which
PTX suits a device.

They live in `multilora/cuda/data/` as package data, so a wheel, an editable install, a checkout
on PYTHONPATH and the Docker image (which copies `backend_src/`) all carry the same single copy,
read through importlib.resources rather than a path guessed from a checkout's layout.
`kernels/build_ptx.py` at the top of the repository regenerates the PTX there.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; annotations only
    from importlib.resources.abc import Traversable

SOURCE_NAME = "lora_kernels.cu"
PTX_NAME = re.compile(r"lora_kernels\.sm_(\d+)\.ptx$")


def data_dir() -> Traversable:
    """The package's `data/` folder (a pathlib.Path for any installed or checked-out package)."""
    return resources.files(__package__) / "data"


def kernel_source() -> str:
    """The CUDA C source of the kernels."""
    return data_dir().joinpath(SOURCE_NAME).read_text()


def available_ptx() -> dict[int, Traversable]:
    """{80: .../lora_kernels.sm_80.ptx, 90: ...} for the committed PTX files present."""
    found = {}
    for entry in data_dir().iterdir():
        m = PTX_NAME.fullmatch(entry.name)
        if m:
            found[int(m.group(1))] = entry
    return found


def ptx_isa(ptx_text: str) -> tuple[int, int]:
    """The PTX ISA version a file declares (`.version 8.5`): the driver must know it to JIT it."""
    m = re.search(r"^\.version (\d+)\.(\d+)\s*$", ptx_text, re.M)
    if not m:
        raise ValueError("no .version directive in the PTX")
    return int(m.group(1)), int(m.group(2))


def choose_ptx(capability: tuple[int, int], available: dict[int, Traversable]) -> Traversable | None:
    """The newest PTX target not above the device's: PTX JITs forward (sm_90 PTX runs on sm_100),
    never backward. None when the device is older than every target (use NVRTC then)."""
    sm = capability[0] * 10 + capability[1]
    fitting = [t for t in available if t <= sm]
    return available[max(fitting)] if fitting else None
