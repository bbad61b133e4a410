"""Which device and dtype the engine runs on, and why: said once in the log, never silently.

`device=auto` takes CUDA when torch can use it, and otherwise says why not (a CPU-only torch, no
driver, a driver older than torch's CUDA) at warning level when a driver is there, since then a
GPU deployment is about to run on the CPU. An explicit `cuda[:N]` that cannot be honoured fails the
model load with what to install.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..cuda.driver import driver_version
from ..errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# dtype=auto per device type: bfloat16 on CUDA (what checkpoints ship in), float32 on CPU (where
# bfloat16 matmuls are slow and the PEFT reference runs).
AUTO_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
TORCH_WHEELS = "https://download.pytorch.org/whl/"


@dataclass(frozen=True)
class CudaStatus:
    """Whether torch can use a GPU; if not, why (`reason`) and what would fix it (`remedy`)."""

    usable: bool
    reason: str = ""
    remedy: str = ""
    driver_found: bool = False


def cuda_status() -> CudaStatus:
    """torch's view of CUDA, explained with torch's own error and the driver's CUDA version."""
    if torch.version.cuda is None and torch.version.hip is None:
        return CudaStatus(False, f"torch {torch.__version__} is a CPU-only build",
                          f"install a CUDA build of torch (the cuXYZ wheels at {TORCH_WHEELS})",
                          driver_version() is not None)
    if torch.cuda.is_available():
        return CudaStatus(True, driver_found=True)
    driver = driver_version()
    built_for = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    if driver is None:
        return CudaStatus(False, f"{built_for} and no NVIDIA driver was found ({_torch_cuda_error()})",
                          "install the NVIDIA driver, or run with device=cpu")
    reason = f"{built_for}, the driver supports CUDA {driver[0]}.{driver[1]} ({_torch_cuda_error()})"
    if _older(driver, torch.version.cuda):
        remedy = (f"install a torch build for CUDA {driver[0]}.{driver[1]} or older (the cuXYZ "
                  f"wheels at {TORCH_WHEELS}), or update the NVIDIA driver to one for CUDA "
                  f"{torch.version.cuda}")
    else:
        remedy = "check that a GPU is visible to this process (nvidia-smi, CUDA_VISIBLE_DEVICES)"
    return CudaStatus(False, reason, remedy, driver_found=True)


def pick_device(spec: str) -> torch.device:
    """The device for parameter `device` (`auto`, `cpu`, `cuda[:N]`), logged with the reason."""
    if spec == "cpu":
        log.info("device: cpu (parameter device=cpu)")
        return torch.device("cpu")
    status = cuda_status()
    if spec == "auto" and not status.usable:
        level = logging.WARNING if status.driver_found else logging.INFO
        log.log(level, "device: cpu (device=auto, CUDA is not usable: %s; to use the GPU, %s)",
                status.reason, status.remedy)
        return torch.device("cpu")
    if not status.usable:
        raise ConfigError(f"parameter 'device' is {spec!r} but CUDA is not usable: {status.reason}. "
                          f"To run on the GPU, {status.remedy}; or set device=cpu")
    device = torch.device("cuda" if spec == "auto" else spec)
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"parameter 'device' is {spec!r} but torch sees {count} GPU(s) "
                          f"(cuda:0 to cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
    log.info("device: %s, %s (parameter device=%s; torch %s, CUDA %s)", device,
             torch.cuda.get_device_name(index), spec, torch.__version__, torch.version.cuda)
    return device


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Parameter `dtype`; `auto` follows AUTO_DTYPE."""
    return DTYPES[spec] if spec != "auto" else AUTO_DTYPE[device.type]


def _torch_cuda_error() -> str:
    """The first line of torch's own CUDA initialisation error (it names the driver problem)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # what we came for
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "torch.cuda.is_available() is False"


def _older(driver: tuple[int, int], torch_cuda: str) -> bool:
    major, minor = (int(p) for p in torch_cuda.split(".")[:2])
    return driver < (major, minor)
