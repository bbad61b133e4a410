"""The GPU check's first stage: the machine, its driver, the Python stack and the CUDA tools.

It saves what it has learned after every step (versions and driver signs first, before the slow
`import torch`), so that a stage killed at its limit still reports them. Whether a driver is
present is known without torch (`driver_signs`): with one, CUDA that is not usable, or a stage that
did not finish, is a failure of the GPU run, never a silent skip.
"""
from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_check.harness import Context

PACKAGES = ("torch", "cuda-bindings", "cuda-python", "transformers", "peft", "safetensors", "pytest")
# The cuda.bindings.driver names multilora.cuda (module, lora_launch) and the emulation use.
DRIVER_API = ("cuInit", "cuDriverGetVersion", "cuGetErrorString", "cuDeviceGet", "cuDeviceGetAttribute",
              "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease", "cuCtxGetCurrent", "cuCtxSetCurrent",
              "cuModuleLoadData", "cuModuleGetFunction", "cuLaunchKernel", "CUstream", "CUdevice_attribute",
              "CUDA_KERNEL_NODE_PARAMS")


def find_tool(name: str) -> str | None:
    """A CUDA toolkit binary: on PATH, under $CUDA_HOME, or the usual /usr/local/cuda."""
    for candidate in (shutil.which(name), *(Path(os.environ[v]) / "bin" / name for v in ("CUDA_HOME", "CUDA_PATH")
                                            if os.environ.get(v)), Path("/usr/local/cuda/bin") / name):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def driver_signs() -> list[str]:
    """What says an NVIDIA driver is installed, found without torch or a driver call: device
    nodes, nvidia-smi, the libcuda library. Empty on a machine without one."""
    signs = []
    if nodes := sorted(glob.glob("/dev/nvidia[0-9]*")):
        signs.append(f"device nodes {', '.join(nodes)}")
    if exe := shutil.which("nvidia-smi"):
        signs.append(f"nvidia-smi at {exe}")
    if lib := ctypes.util.find_library("cuda"):
        signs.append(f"driver library {lib}")
    return signs


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi() -> tuple[str, str] | None:
    """(first GPU's name, driver version) from nvidia-smi; None without it, or when it hangs or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):  # a hung or broken nvidia-smi: the driver API says more
        return None
    name, _, version = out[0].rpartition(", ") if out else ("", "", "")
    return (name, version) if version else None


def cuda_bindings_report() -> tuple[dict, list[str]]:
    """cuda.bindings' version, the driver's CUDA version through it, and any driver API name our
    code uses that this version lacks (cuda-bindings 13 removed and renamed some)."""
    facts: dict = {}
    lines = []
    try:
        from cuda import bindings
        from cuda.bindings import driver
    except Exception as exc:  # no cuda-bindings: the kernels cannot load, the engine can still run
        return {"cuda_bindings": f"not importable ({exc})"}, [f"- cuda.bindings: not importable ({exc})"]
    version = getattr(bindings, "__version__", _version("cuda-bindings"))
    missing = [name for name in DRIVER_API if not hasattr(driver, name)]
    facts.update(cuda_bindings=version, driver_api_missing=missing)
    lines.append(f"- cuda.bindings {version}: driver API names our code uses "
                 + (f"MISSING: {', '.join(missing)}" if missing else f"all present ({len(DRIVER_API)})"))
    try:
        err, cuda_version = driver.cuDriverGetVersion()
        if int(err) == 0:
            facts["driver_cuda"] = f"{cuda_version // 1000}.{cuda_version % 1000 // 10}"
            lines.append(f"- cuDriverGetVersion: CUDA {facts['driver_cuda']}")
        else:
            lines.append(f"- cuDriverGetVersion: {getattr(err, 'name', err)}")
    except Exception as exc:  # no libcuda: said here, the driver signs above say whether one was expected
        lines.append(f"- cuDriverGetVersion: {type(exc).__name__}: {exc}")
    return facts, lines


def run_env(ctx: Context) -> dict:
    started = time.monotonic()
    facts: dict = {"cuda_usable": False, "driver_signs": driver_signs(),
                   "versions": {p: _version(p) for p in PACKAGES}}
    facts["software"] = (f"Python {platform.python_version()}, "
                         + ", ".join(f"{p} {v}" for p, v in facts["versions"].items()))
    tools = {t: find_tool(t) or "not found" for t in ("ptxas", "compute-sanitizer", "nvidia-smi")}
    details = [f"- Python: {sys.executable} ({platform.python_version()})",
               *(f"- {p}: {v}" for p, v in facts["versions"].items()), *(f"- {t}: {p}" for t, p in tools.items()),
               f"- driver signs: {'; '.join(facts['driver_signs']) or 'none'}"]

    def save(summary: str, status: str = "FAIL", partial: bool = True) -> dict:
        result = {"status": status, "summary": summary, "facts": facts, "details": "\n".join(details)}
        if partial:
            result["partial"] = True
        ctx.report(result)
        return result

    def step(what: str) -> None:
        details.append(f"- ({time.monotonic() - started:.1f} s) {what}")
        save(f"stopped after: {what}")

    step("versions read")
    if smi := _nvidia_smi():
        facts["gpu_name"], facts["driver_version"] = smi
    step(f"nvidia-smi: {', '.join(smi) if smi else 'no answer'}")
    bindings_facts, bindings_lines = cuda_bindings_report()
    facts.update(bindings_facts)
    details += bindings_lines
    facts["driver"] = " / ".join(filter(None, [facts.get("driver_version"), facts.get("driver_cuda")
                                               and f"CUDA {facts['driver_cuda']}"])) or "none found"
    step(f"cuda.bindings checked; driver: {facts['driver']}")
    try:
        import torch
    except Exception as exc:  # a bare python3 without torch: nothing on the GPU can run
        details.append(f"- torch is not importable: {exc}")
        return _verdict(ctx, save, facts, f"torch is not importable by {sys.executable} ({exc})")
    step(f"import torch {torch.__version__} (CUDA build {torch.version.cuda})")
    from multilora.engine.device import cuda_status

    status = cuda_status()
    facts["torch_cuda"] = torch.version.cuda
    if not status.usable:
        step(f"CUDA not usable: {status.reason}; {status.remedy}")
        return _verdict(ctx, save, facts, status.reason)
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                    f"{p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2**20:.0f} MiB)")
    facts.update(cuda_usable=True, gpu=gpus[0] + (f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""))
    step("CUDA initialised: " + "; ".join(f"GPU {i}: {g}" for i, g in enumerate(gpus)))
    return save(f"{gpus[0]}; driver {facts['driver']}; torch {torch.__version__}, cuda-bindings "
                f"{facts.get('cuda_bindings', '?')}", "PASS", partial=False)


def _verdict(ctx: Context, save, facts: dict, reason: str) -> dict:
    """No usable CUDA: a dry run carries on; with a driver present it is the GPU run's failure;
    on a machine without a driver the GPU stages are skipped."""
    if ctx.dry:
        return save(f"dry run on the CPU (no GPU used): {reason}", "PASS", partial=False)
    if facts["driver_signs"]:
        return save(f"a driver is present ({facts['driver_signs'][0]}) but CUDA is not usable: {reason}",
                    "FAIL", partial=False)
    return save(reason, "SKIP", partial=False)
