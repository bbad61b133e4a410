"""Fixtures for the kernel tests: the CPU emulation of the kernels and a naive LoRA reference.

The emulation compiles the package's lora_kernels.cu with g++ against tests/kernels/emu/cuda_emu.h and
runs each launch one block at a time, a thread per CUDA thread. Parameters are packed by
cuda.bindings exactly as for cuLaunchKernel, so the planning, packing and kernel code are the ones
a GPU would run; only the driver and the hardware are missing.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from multilora.kernels.files import data_dir
from multilora.kernels.launch import Launch
from multilora.lora.ops import LoraBatch, LoraWeightTable

EMU_DIR = Path(__file__).parent / "emu"


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Launch]], None]:
    """run(launches): execute the launches on the CPU, on CPU tensors' memory."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CPU emulation of the CUDA kernels needs a C++20 compiler")
    lib = tmp_path_factory.mktemp("emu") / "lora_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
           "-Wall", "-Wno-unknown-pragmas", "-Werror", f"-I{data_dir()}", str(EMU_DIR / "emu_launch.cpp"),
           "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"emulation build failed:\n{proc.stderr}"
    emu = ctypes.CDLL(str(lib))
    emu.emu_launch.restype = ctypes.c_int
    emu.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_void_p]
    from cuda.bindings import driver

    def run(launches: list[Launch]) -> None:
        for launch in launches:
            node = driver.CUDA_KERNEL_NODE_PARAMS()  # packs like cuLaunchKernel, needs no GPU
            node.kernelParams = launch.params
            rc = emu.emu_launch(launch.kernel.encode(), *launch.grid, *launch.block,
                                node.kernelParams)
            assert rc == 0, f"emulation has no kernel {launch.kernel}"

    return run


def random_table(gen: torch.Generator, h_in: int, h_out: int, ranks: list[int | None],
                 dtype: torch.dtype = torch.float32) -> LoraWeightTable:
    """A table with one slot per entry of `ranks` (None = empty slot), weights ~ N(0, 1/fan_in)."""
    table = LoraWeightTable(h_in, h_out, len(ranks))
    for slot, r in enumerate(ranks):
        if r is None:
            continue
        a = torch.randn(h_in, r, generator=gen) / h_in**0.5
        b = torch.randn(r, h_out, generator=gen) / r**0.5
        table.set_slot(slot, a.to(dtype), b.to(dtype))
    return table


def random_slots(gen: torch.Generator, num_tokens: int, num_slots: int,
                 run_len: int = 1) -> list[int]:
    """Per-token slots in runs of ~run_len (as the runner sorts them), with some -1 (no adapter)."""
    slots: list[int] = []
    while len(slots) < num_tokens:
        s = int(torch.randint(-1, num_slots, (1,), generator=gen))
        n = int(torch.randint(1, 2 * run_len, (1,), generator=gen))
        slots += [s] * n
    return slots[:num_tokens]


def naive_lora(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable,
               slots: list[int]) -> torch.Tensor:
    """y + the LoRA delta, row by row in float64: the definition, with no batching at all."""
    out = y.double().clone()
    for t, slot in enumerate(slots):
        if slot < 0 or table.a[slot] is None:
            continue
        out[t] += (x[t].double() @ table.a[slot].double()) @ table.b[slot].double()
    return out


def fused_output(gen: torch.Generator, num_tokens: int, h_out: int, dtype: torch.dtype,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(full, y): y is a column slice of a wider `full`, as q/k/v slices of a fused qkv output."""
    full = torch.randn(num_tokens, h_out + 13, generator=gen).to(dtype=dtype, device=device)
    return full, full[:, 5 : 5 + h_out]


def make_batch(slots: list[int], device: str = "cpu") -> LoraBatch:
    return LoraBatch.from_token_slots(slots, device)


@pytest.fixture
def lora_ref() -> SimpleNamespace:
    """The helpers above, for test modules (importlib mode keeps conftest out of their imports)."""
    return SimpleNamespace(random_table=random_table, random_slots=random_slots, naive=naive_lora,
                           fused_output=fused_output, make_batch=make_batch)
