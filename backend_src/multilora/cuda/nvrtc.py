"""CUDA C -> PTX with NVRTC, shared by `kernels/build_ptx.py` and the runtime fallback.

One function so the committed PTX and a PTX compiled at run time (for a GPU older than any
committed target) come from the same options. NVRTC needs no GPU, so this runs on CPU machines;
cuda.bindings is imported inside the functions, so importing this module loads no CUDA library.
"""
from __future__ import annotations

# The options are part of what the committed PTX was built from: build_ptx.py records them in the
# PTX header and the freshness test compares them.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)


class NvrtcError(RuntimeError):
    """NVRTC is missing or refused the source; the message carries the compile log."""


def _check(result: tuple, call: str, log: str = "") -> tuple:
    from cuda.bindings import nvrtc

    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, name = nvrtc.nvrtcGetErrorString(err)
        detail = f"\n{log}" if log else ""
        raise NvrtcError(f"{call} failed: {name.decode()}{detail}")
    return result[1:]


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the loaded NVRTC; raises NvrtcError when it cannot be loaded."""
    try:
        from cuda.bindings import nvrtc

        major, minor = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except NvrtcError:
        raise
    except Exception as exc:  # the library itself is missing: no wheel, no toolkit
        raise NvrtcError(f"NVRTC could not be loaded ({exc}); install nvidia-cuda-nvrtc-cu12") from exc
    return int(major), int(minor)


def compile_ptx(source: str, arch: str, name: str = "lora_kernels.cu") -> str:
    """Compile `source` for a virtual architecture such as "compute_90"; returns the PTX text."""
    from cuda.bindings import nvrtc

    nvrtc_version()  # a clear error when the library is absent
    (prog,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                     "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in NVRTC_OPTIONS)]
        (compile_err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if compile_err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (log_size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * log_size
            _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            _check((compile_err,), f"nvrtcCompileProgram({arch})", log.decode(errors="replace"))
        (size,) = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        _check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    finally:
        _check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return ptx.rstrip(b"\0").decode()
