"""What every use of our kernels shares: driver-call errors, the driver's CUDA version (and the one
a PTX ISA needs), the torch-dtype -> kernel-dtype table, and the one helper that readies a step's
context and stream.

Nothing here touches the driver at import time (cuda.bindings is imported inside the functions
that call it), so the engine imports this module on machines without CUDA.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .module import CudaKernels

# The kernels' entry points are suffixed by element type: lora_shrink_token_bf16, paged_decode_f32.
DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


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
        from cuda.bindings import driver  # here: importing this module never loads the driver

        code, text = driver.cuGetErrorString(err)
        if int(code) == 0 and text:
            return f"{name} ({text.decode()})"
    except Exception:  # no driver library: the enum name is all we have
        pass
    return name


def driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports, e.g. (12, 4); None without a driver."""
    try:
        from cuda.bindings import driver  # here: importing this module never loads the driver

        version = int(check(driver.cuDriverGetVersion(), "cuDriverGetVersion"))
    except Exception:  # no cuda-bindings or no libcuda: nothing to report
        return None
    return _major_minor(version)


def _major_minor(version: int) -> tuple[int, int]:
    """CUDA's integer versions: 12040 is 12.4."""
    return version // 1000, version % 1000 // 10


def isa_needs(isa: tuple[int, int]) -> str:
    """ "ISA 8.5 (a CUDA 12.5+ driver)": the PTX ISA and the oldest driver that JITs it."""
    text = f"ISA {isa[0]}.{isa[1]}"
    try:
        from cuda.bindings.utils import get_minimal_required_cuda_ver_from_ptx_ver

        version = get_minimal_required_cuda_ver_from_ptx_ver(f"{isa[0]}.{isa[1]}")
    except Exception:  # an older cuda-bindings without the table, or an ISA newer than it knows
        return text
    major, minor = _major_minor(version)
    return f"{text} (a CUDA {major}.{minor}+ driver)"


def step_stream(kernels: CudaKernels | None, device: torch.device) -> int:
    """Ready a step's launches: make the kernels' context current in this thread, and return the raw
    stream to launch on, torch's current stream on `device` (so the kernels order with torch's work).

    Called once per step, in the thread that runs the forward pass. Without kernels (plans only:
    the tests run them on a CPU emulation) nothing is made current, and off CUDA the stream is 0.
    """
    if kernels is not None:
        kernels.make_current()
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
