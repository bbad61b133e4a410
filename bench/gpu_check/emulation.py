"""Our CUDA kernels on their CPU emulation (tests/cuda/emu): what the kernel tests and the GPU
check's dry run launch when there is no GPU.

The package's lora_kernels.cu is compiled with g++ against tests/cuda/emu/cuda_emu.h; each launch
runs one block at a time, a thread per CUDA thread. Parameters come packed as the engine packs them
for cuLaunchKernel (multilora.cuda.launches), or by cuda.bindings from a plan's (values, types), so
the planning, packing and kernel code are the ones a GPU would run; only the driver and the hardware
are missing. Slow (an OS thread per CUDA thread): tiny shapes only.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common.paths import REPO
from multilora.cuda.files import available_ptx, data_dir, ptx_isa
from multilora.cuda.launches import Launch, PackedLaunch

EMU_DIR = REPO / "tests" / "cuda" / "emu"
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-Wall",
             "-Wno-unknown-pragmas", "-Werror")
EMULATED_CAPABILITY = (9, 0)  # the PTX an H100/H200 loads is the one the dry run reports on


def build_emulator(out_dir: Path) -> Path:
    """The emulator's shared library, compiled into `out_dir` once per version of its sources.

    Raises FileNotFoundError without g++, RuntimeError with the compiler's output when it fails."""
    cxx = shutil.which("g++")
    if cxx is None:
        raise FileNotFoundError("g++ not found: the CPU emulation of the CUDA kernels needs a C++20 compiler")
    kernels = Path(str(data_dir()))
    digest = hashlib.sha256(" ".join(CXX_FLAGS).encode())
    for source in (EMU_DIR / "emu_launch.cpp", EMU_DIR / "cuda_emu.h", kernels / "lora_kernels.cu"):
        digest.update(source.read_bytes())
    lib = out_dir / f"lora_emu-{digest.hexdigest()[:12]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")
    os.close(fd)
    proc = subprocess.run([cxx, *CXX_FLAGS, f"-I{kernels}", str(EMU_DIR / "emu_launch.cpp"), "-o", tmp],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"emulation build failed:\n{proc.stderr}")
    os.replace(tmp, lib)  # another process building the same version meanwhile is harmless
    return lib


class Emulator:
    """The loaded emulator: `emulator(launches)` executes launches on CPU tensors' memory."""

    def __init__(self, lib: Path) -> None:
        self._emu = ctypes.CDLL(str(lib))
        self._emu.emu_launch.restype = ctypes.c_int
        self._emu.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_void_p]

    def __call__(self, launches: list[Launch | PackedLaunch]) -> None:
        from cuda.bindings import driver

        for launch in launches:
            if isinstance(launch, PackedLaunch):  # packed as the engine launches it
                params = launch.address
            else:
                node = driver.CUDA_KERNEL_NODE_PARAMS()  # packs like cuLaunchKernel, needs no GPU
                node.kernelParams = launch.params
                params = node.kernelParams
            if self._emu.emu_launch(launch.kernel.encode(), *launch.grid, *launch.block, params) != 0:
                raise KeyError(f"the emulation has no kernel {launch.kernel}")

    def knows(self, name: str) -> bool:
        """Whether the emulation has kernel `name` (asked with an empty grid: nothing runs)."""
        return self._emu.emu_launch(name.encode(), 0, 0, 0, 1, 1, 1, None) == 0


class EmulatedKernels:
    """What the benchmarks and PagedDecode use of loader.CudaKernels, on the CPU emulation: an
    H100/H200-like device (its PTX named as the one loaded, `sm_count` SMs for the launch plans)."""

    def __init__(self, out_dir: Path, sm_count: int = 4) -> None:
        self._run = Emulator(build_emulator(out_dir))
        self.capability = EMULATED_CAPABILITY
        self.sm_count = sm_count
        target = EMULATED_CAPABILITY[0] * 10 + EMULATED_CAPABILITY[1]
        ptx = available_ptx()[max(t for t in available_ptx() if t <= target)]
        self.ptx_source = ptx.name
        self.ptx_isa = ptx_isa(ptx.read_text())

    def make_current(self) -> None:
        """Nothing to make current on the CPU."""

    def function(self, name: str) -> str:
        if not self._run.knows(name):
            raise KeyError(f"the emulation has no kernel {name}")
        return name

    def launch(self, launch: PackedLaunch, stream: int) -> None:
        self._run([launch])
