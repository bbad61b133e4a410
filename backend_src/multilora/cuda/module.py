"""Loads our kernels' PTX into PyTorch's CUDA context and launches them (cuda.bindings.driver).

One module holds the LoRA kernels and the paged decode attention kernels (data/lora_kernels.cu),
so one load per device serves both, and parameter `cuda_kernels` decides for both.

Why the driver API and not a torch extension: the PTX is committed, so the server needs no
compiler at install time, and the driver JITs it for whatever GPU it finds (sm_80 and newer from
the committed files; older GPUs through NVRTC at load time). Kernels run in the device's primary
context, the one PyTorch uses, on PyTorch's current stream, so they order with PyTorch's work.
Nothing here touches the driver at import time: this module imports on machines without CUDA.

The engine calls `load_cuda_kernels` once at start. Each device is loaded at most once per
process, success or failure: a failure is remembered (never retried per call) and holds no
context reference.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CUDA_KERNEL_MODES
from ..errors import ConfigError
from .driver import check, driver_version, isa_needs
from .files import SOURCE_NAME, available_ptx, choose_ptx, kernel_source, ptx_isa
from .launches import PackedLaunch
from .nvrtc import compile_ptx

log = logging.getLogger(__name__)


def ptx_for(capability: tuple[int, int]) -> tuple[str, str]:
    """(where it came from, PTX text) for a device: a committed file, else compiled by NVRTC."""
    chosen = choose_ptx(capability, available_ptx())
    if chosen is not None:
        return chosen.name, chosen.read_text()
    arch = f"compute_{capability[0]}{capability[1]}"  # a GPU older than every committed target
    return f"NVRTC {arch} of {SOURCE_NAME}", compile_ptx(kernel_source(), arch)


class CudaKernels:
    """The kernel module loaded in one device's primary context; launches on a given stream."""

    def __init__(self, device_index: int) -> None:
        from cuda.bindings import driver  # here: importing this module never loads the driver

        self._driver = driver
        check(driver.cuInit(0), "cuInit")
        self.device = check(driver.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
        self.capability = (self._attribute("COMPUTE_CAPABILITY_MAJOR"),
                           self._attribute("COMPUTE_CAPABILITY_MINOR"))
        self.sm_count = self._attribute("MULTIPROCESSOR_COUNT")
        self.ptx_source, ptx = ptx_for(self.capability)
        self.ptx_isa = ptx_isa(ptx)
        # Retained once for the process (PyTorch holds the same primary context), released if the
        # module cannot be loaded so that a failed load leaves nothing behind.
        self.context = check(driver.cuDevicePrimaryCtxRetain(self.device),
                             f"cuDevicePrimaryCtxRetain({device_index})")
        try:
            self.make_current()
            self.module = check(driver.cuModuleLoadData(ptx.encode() + b"\0"),
                                f"cuModuleLoadData({self.ptx_source})")
        except BaseException:
            driver.cuDevicePrimaryCtxRelease(self.device)
            raise
        self._functions: dict[str, Any] = {}
        self._streams: dict[int, Any] = {}  # raw stream -> CUstream, made once each
        self._success = driver.CUresult.CUDA_SUCCESS

    def _attribute(self, name: str) -> int:
        attr = getattr(self._driver.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
        return int(check(self._driver.cuDeviceGetAttribute(attr, self.device),
                         f"cuDeviceGetAttribute({name})"))

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

    def launch(self, launch: PackedLaunch, stream: int) -> None:
        """Enqueue one kernel on `stream` (a raw cudaStream_t, e.g. torch's current stream), with the
        arguments as packed now. The hot path of every step: nothing is built per call but the call."""
        handle = self._streams.get(stream)
        if handle is None:
            handle = self._streams[stream] = self._driver.CUstream(stream)
        result = self._driver.cuLaunchKernel(self.function(launch.kernel), *launch.grid, *launch.block, 0, handle,
                                             launch.address, 0)
        if result[0] != self._success:
            check(result, f"cuLaunchKernel({launch.kernel}, grid={launch.grid}, block={launch.block})")


@dataclass(frozen=True)
class LoadFailure:
    """Why a device's kernels could not be loaded: remembered so that nothing retries the load."""

    reason: str


_loaded: dict[int, CudaKernels | LoadFailure] = {}
_lock = threading.Lock()


def load_cuda_kernels(device: torch.device, mode: str) -> CudaKernels | None:
    """Our kernels for `device` as parameter `cuda_kernels` asks, loaded once per device.

    None on a CPU device, for `off`, and for `auto` when the load failed (one error is logged and
    the engine uses the PyTorch path). `on` raises ConfigError with the reason instead.
    """
    if mode not in CUDA_KERNEL_MODES:
        raise ConfigError(f"parameter 'cuda_kernels' must be auto, on or off, got {mode!r}")
    if mode == "off" or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    result, first_try = _load_once(index)
    if isinstance(result, LoadFailure):
        if mode == "on":
            raise ConfigError(f"{result.reason}. Parameter cuda_kernels=on requires the kernels; "
                              "set it to auto (fall back to the PyTorch path) or off")
        if first_try:
            log.error("%s. Using the PyTorch path for LoRA and decode attention instead (cuda_kernels=auto)",
                      result.reason)
        return None
    result.make_current()
    return result


def loaded() -> dict[int, str]:
    """What each device's load came to (the PTX loaded, or why not): for reports and checks."""
    with _lock:
        return {index: result.ptx_source if isinstance(result, CudaKernels) else f"failed: {result.reason}"
                for index, result in _loaded.items()}


def _load_once(index: int) -> tuple[CudaKernels | LoadFailure, bool]:
    """The device's load result, and whether this call made it (the first try)."""
    with _lock:
        result = _loaded.get(index)
        if result is not None:
            return result, False
        try:
            result = CudaKernels(index)
        except Exception as exc:
            result = LoadFailure(_failure_reason(index, exc))
        _loaded[index] = result
        return result, True


def _failure_reason(index: int, exc: Exception) -> str:
    """The error, the CUDA version the driver supports and the PTX ISA of the committed files."""
    version = driver_version()
    driver = f"CUDA {version[0]}.{version[1]}" if version else "an unknown CUDA version"
    isas = sorted({ptx_isa(entry.read_text()) for entry in available_ptx().values()})
    needs = ", ".join(isa_needs(isa) for isa in isas)
    return (f"LoRA kernels could not be loaded on cuda:{index}: {exc}. The driver supports {driver}; "
            f"the committed PTX is {needs}. Update the NVIDIA driver, or set cuda_kernels=off")
