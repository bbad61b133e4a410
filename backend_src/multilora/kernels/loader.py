"""Loads the LoRA PTX into PyTorch's CUDA context and launches its kernels (cuda.bindings.driver).

Why the driver API and not a torch extension: the PTX is committed, so the server needs no
compiler at install time, and the driver JITs it for whatever GPU it finds (sm_80 and newer from
the committed files; older GPUs through NVRTC at load time). Kernels run in the device's primary
context, the one PyTorch uses, on PyTorch's current stream, so they order with PyTorch's work.
Nothing here touches the driver at import time: this module imports on machines without CUDA.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from multilora.kernels.launch import Launch
from multilora.kernels.nvrtc import KERNEL_SOURCE, compile_ptx

PTX_NAME = re.compile(r"lora_kernels\.sm_(\d+)\.ptx$")


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


def check(result: Any, call: str) -> Any:
    """Unwrap a cuda.bindings result tuple: raise CudaError naming `call`, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{call} failed: {_error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_text(err: Any) -> str:
    name = getattr(err, "name", str(err))
    try:
        from cuda.bindings import driver

        code, text = driver.cuGetErrorString(err)
        if int(code) == 0 and text:
            return f"{name} ({text.decode()})"
    except Exception:  # no driver library: the enum name is all we have
        pass
    return name


def kernels_dir() -> Path:
    """Where the PTX lives: $MULTILORA_KERNELS_DIR, else <repo>/kernels next to the .cu."""
    return Path(os.environ.get("MULTILORA_KERNELS_DIR", KERNEL_SOURCE.parent))


def available_ptx(directory: Path) -> dict[int, Path]:
    """{80: .../lora_kernels.sm_80.ptx, 90: ...} for the committed files present."""
    found = {}
    for path in directory.glob("lora_kernels.sm_*.ptx"):
        m = PTX_NAME.search(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def choose_ptx(capability: tuple[int, int], available: dict[int, Path]) -> Path | None:
    """The newest PTX target not above the device's: PTX JITs forward (sm_90 PTX runs on sm_100),
    never backward. None when the device is older than every target (use NVRTC then)."""
    sm = capability[0] * 10 + capability[1]
    fitting = [t for t in available if t <= sm]
    return available[max(fitting)] if fitting else None


class LoraKernels:
    """The kernel module loaded in one device's primary context; launches on a given stream."""

    def __init__(self, device_index: int, directory: Path | None = None) -> None:
        from cuda.bindings import driver

        self._driver = driver
        check(driver.cuInit(0), "cuInit")
        self.device = check(driver.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
        attr = driver.CUdevice_attribute
        major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                  self.device), "cuDeviceGetAttribute(CC major)")
        minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                                  self.device), "cuDeviceGetAttribute(CC minor)")
        self.capability = (int(major), int(minor))
        self.sm_count = int(check(driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.device), "cuDeviceGetAttribute(SMs)"))
        # Retained once for the process; PyTorch holds the same primary context.
        self.context = check(driver.cuDevicePrimaryCtxRetain(self.device),
                             f"cuDevicePrimaryCtxRetain({device_index})")
        self.make_current()
        directory = directory or kernels_dir()
        ptx_path = choose_ptx(self.capability, available_ptx(directory))
        if ptx_path is not None:
            self.ptx_source = str(ptx_path)
            ptx = ptx_path.read_bytes()
        else:  # a GPU older than every committed target
            arch = f"compute_{major}{minor}"
            self.ptx_source = f"NVRTC {arch}"
            ptx = compile_ptx((directory / KERNEL_SOURCE.name).read_text(), arch).encode()
        self.module = check(driver.cuModuleLoadData(ptx + b"\0"),
                            f"cuModuleLoadData({self.ptx_source})")
        self._functions: dict[str, Any] = {}

    def make_current(self) -> None:
        """Make the primary context current in this thread if it is not (e.g. a fresh worker)."""
        driver = self._driver
        current = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if current is None or int(current) != int(self.context):
            check(driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = check(self._driver.cuModuleGetFunction(self.module, name.encode()),
                       f"cuModuleGetFunction({name})")
            self._functions[name] = fn
        return fn

    def launch(self, launch: Launch, stream: int) -> None:
        """Enqueue one kernel on `stream` (a raw cudaStream_t, e.g. torch's current stream)."""
        driver = self._driver
        check(driver.cuLaunchKernel(self.function(launch.kernel), *launch.grid, *launch.block, 0,
                                    driver.CUstream(stream), launch.params, 0),
              f"cuLaunchKernel({launch.kernel}, grid={launch.grid}, block={launch.block})")


_loaded: dict[int, LoraKernels] = {}
_lock = threading.Lock()


def kernels_for(device_index: int) -> LoraKernels:
    """The loaded module for a device, loading it on first use (thread-safe), made current."""
    kernels = _loaded.get(device_index)
    if kernels is None:
        with _lock:
            kernels = _loaded.get(device_index)
            if kernels is None:
                kernels = _loaded[device_index] = LoraKernels(device_index)
    kernels.make_current()
    return kernels


def load_lora_kernels(device: "torch.device", mode: str = "auto") -> LoraKernels | None:
    """The LoRA kernels for the engine's device, loaded once at start; None on CPU or when off."""
    if device.type != "cuda" or mode == "off":
        return None
    import torch

    return kernels_for(device.index if device.index is not None else torch.cuda.current_device())
