"""GPU check stages about the machine and our kernels: environment, load, correctness, speed of the
LoRA kernels, and decode attention (the paged kernel against the gather + SDPA path).

Each `run_<stage>(ctx)` runs in its own process (python -m bench.gpu_check) and returns
{"status", "summary", "details" (markdown), "facts", "floors"}.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common.paths import REPO
from bench.gpu_check.harness import Context, child_env, run_limited, tail

PACKAGES = ("torch", "cuda-bindings", "cuda-python", "transformers", "peft", "safetensors", "pytest")
DECODE = [(64, 64, 16, 4096, 4096), (64, 64, 16, 4096, 14336), (64, 64, 16, 14336, 4096),
          (64, 64, 64, 4096, 4096), (32, 32, 16, 4096, 4096)]  # tokens, adapters, rank, h_in, h_out
PREFILL = [(2048, 4, 16, 4096, 4096), (2048, 4, 16, 4096, 14336), (2048, 1, 64, 4096, 4096)]
COPY_FLOOR = 0.6


def find_tool(name: str) -> str | None:
    """A CUDA toolkit binary: on PATH, under $CUDA_HOME, or the usual /usr/local/cuda."""
    for candidate in (shutil.which(name), *(Path(os.environ[v]) / "bin" / name for v in ("CUDA_HOME", "CUDA_PATH")
                                            if os.environ.get(v)), Path("/usr/local/cuda/bin") / name):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):  # a hung or broken nvidia-smi: the driver API says enough
        return None
    return out[0] if out else None


def run_env(ctx: Context) -> dict:
    versions = {p: _version(p) for p in PACKAGES}
    software = f"Python {platform.python_version()}, " + ", ".join(f"{p} {v}" for p, v in versions.items())
    facts: dict = {"cuda_usable": False, "software": software}
    tools = {t: find_tool(t) or "not found" for t in ("ptxas", "compute-sanitizer", "nvidia-smi")}
    details = [f"- Python: {sys.executable} ({platform.python_version()})",
               *(f"- {p}: {v}" for p, v in versions.items()), *(f"- {t}: {p}" for t, p in tools.items())]
    try:
        import torch
    except Exception as exc:  # a bare python3 without torch: nothing on the GPU can run
        return {"status": "SKIP", "summary": f"torch is not importable by {sys.executable} ({exc})",
                "facts": facts, "details": "\n".join(details)}
    from multilora.engine.device import cuda_status
    from multilora.kernels.loader import driver_version

    status = cuda_status()
    cuda = driver_version()
    driver = " / ".join(filter(None, [_nvidia_smi_driver(), cuda and f"CUDA {cuda[0]}.{cuda[1]}"])) or "none found"
    facts.update(driver=driver, torch_cuda=torch.version.cuda)
    details += [f"- torch CUDA build: {torch.version.cuda}", f"- driver: {driver}"]
    if not status.usable:
        details.append(f"- CUDA not usable: {status.reason}; {status.remedy}")
        return {"status": "SKIP", "summary": f"{status.reason}", "facts": facts, "details": "\n".join(details)}
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                    f"{p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2**20:.0f} MiB)")
    facts.update(cuda_usable=True, gpu=gpus[0] + (f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""))
    details += [f"- GPU {i}: {g}" for i, g in enumerate(gpus)]
    return {"status": "PASS", "summary": f"{gpus[0]}; driver {driver}; torch {torch.__version__}",
            "facts": facts, "details": "\n".join(details)}


def _build_ptx():
    """kernels/build_ptx.py as a module (its ptxas report parser)."""
    spec = importlib.util.spec_from_file_location("build_ptx", REPO / "kernels" / "build_ptx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_kernels(ctx: Context) -> dict:
    """load_lora_kernels(on) with the JIT cache off (CUDA_CACHE_DISABLE): which PTX, how long."""
    import torch

    from multilora.kernels import files
    from multilora.kernels.loader import load_lora_kernels

    torch.cuda.init()
    started = time.perf_counter()
    kernels = load_lora_kernels(torch.device("cuda"), "on")
    load_s = time.perf_counter() - started
    committed = files.PTX_NAME.fullmatch(kernels.ptx_source)  # else NVRTC compiled it at load
    ptx = files.available_ptx()[int(committed.group(1))] if committed else None
    names = re.findall(r"\.entry (\w+)\(", ptx.read_text()) if ptx else []
    started = time.perf_counter()
    for name in names:
        kernels.function(name)
    functions_s = time.perf_counter() - started
    cc = f"sm_{kernels.capability[0]}{kernels.capability[1]}"
    details = [f"- PTX: {kernels.ptx_source} (ISA {kernels.ptx_isa[0]}.{kernels.ptx_isa[1]}) on {cc}, "
               f"{kernels.sm_count} SMs",
               f"- load with JIT (CUDA_CACHE_DISABLE=1): {load_s:.2f} s; {len(names)} functions resolved "
               f"in {functions_s:.3f} s"]
    status, ptxas_note = "PASS", ""
    exe = find_tool("ptxas")
    if exe and ptx:
        build_ptx = _build_ptx()
        report = build_ptx.parse_ptxas(build_ptx.run_ptxas(Path(exe), Path(str(ptx)), cc, ctx.work))
        spills = {n: k for n, k in report.items() if k.get("spill_stores") or k.get("spill_loads") or k.get("stack")}
        details += ["", f"`ptxas -v -arch={cc}` ({exe}):", "", build_ptx.report_table({cc: report})]
        ptxas_note = f"; ptxas: {len(spills)} kernels spill" if spills else "; ptxas: no spills"
        status = "FAIL" if spills else status
    else:
        details.append("- ptxas: not found, registers not reported")
    return {"status": status, "facts": {"ptx": kernels.ptx_source, "jit_s": load_s},
            "summary": f"{kernels.ptx_source} JIT-loaded in {load_s:.2f} s on {cc}{ptxas_note}",
            "details": "\n".join(details)}


PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE"]


def _pytest_counts(output: str) -> str:
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary"


def _sanitizer(ctx: Context, tool: str, select: str, limit_s: float,
               tests_file: str = "tests/kernels/test_gpu_kernels.py", kernels: str = "lora_") -> tuple[bool, str]:
    """compute-sanitizer `tool` on the tests of `tests_file` matching `select`, on the kernels whose
    names start with `kernels` only, no torch cache (each tensor its own allocation, so memcheck
    sees every out-of-bounds byte)."""
    exe = find_tool("compute-sanitizer")
    if exe is None:
        return True, f"{tool}: compute-sanitizer not found, not run"
    env = child_env({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    tests = [*ctx.python, *PYTEST, tests_file, "-k", select]
    cmd = [exe, "--tool", tool, "--kernel-name", f"kns={kernels}", "--error-exitcode", "99", *tests]
    code, out = run_limited(cmd, limit_s, env, log=ctx.work / f"sanitizer-{tool}-{kernels.rstrip('_')}.log")
    if code not in (0, 99) and re.search(r"(?i)unrecogni[sz]ed|unknown option", out):  # an older tool
        code, out = run_limited([exe, "--tool", tool, "--error-exitcode", "99", *tests], ctx.left_s() / 2, env)
    if code is None:
        return False, f"{tool}: timed out after {limit_s:.0f} s"
    summary = re.findall(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", out)
    verdict = summary[-1] if summary else "no sanitizer summary"
    return code == 0, f"{tool} (-k '{select}'): exit {code}, {verdict}; {_pytest_counts(out)}"


def run_correctness(ctx: Context) -> dict:
    """The gpu tests of tests/kernels (float64 reference), then memcheck and racecheck on a few."""
    code, out = run_limited([*ctx.python, *PYTEST, "tests/kernels"], min(60.0, ctx.left_s() * 0.5),
                            log=ctx.work / "pytest-kernels.log")
    tests_ok = code == 0
    lines = [f"- `pytest -m gpu tests/kernels`: {_pytest_counts(out) if code is not None else 'timed out'}"]
    if not tests_ok:
        lines += ["", "```", tail(out, 40), "```", ""]
    ctx.report({"status": "FAIL", "partial": True, "summary": lines[0], "details": "\n".join(lines)})
    checks = [("memcheck", "sanitizer"), ("racecheck", "sanitizer and not gate_up")]
    sanitizers_ok = True
    for i, (tool, select) in enumerate(checks):
        ok, text = _sanitizer(ctx, tool, select, ctx.left_s() / (len(checks) - i) - 2)
        sanitizers_ok &= ok
        lines.append(f"- {text}")
    status = "PASS" if tests_ok and sanitizers_ok else "FAIL"
    return {"status": status, "summary": "; ".join(ln.lstrip("- ") for ln in lines if ln.startswith("- ")),
            "details": "\n".join(lines)}


def run_kernel_speed(ctx: Context) -> dict:
    """bench.kernels.lora_bandwidth's cases on Llama-3-8B decode and prefill shapes, in bf16."""
    import torch

    import bench.kernels.lora_bandwidth as bench
    from bench.common.bandwidth import device_copy_gbs
    from multilora.kernels.loader import load_lora_kernels

    kernels = load_lora_kernels(torch.device("cuda"), "on")
    copy = device_copy_gbs()
    rows: dict[str, list[dict]] = {"decode": [], "prefill": []}
    text = [f"Device-to-device copy: {copy:.0f} GB/s (read + write), measured in this run.", ""]
    for kind, shapes in (("decode", DECODE), ("prefill", PREFILL)):
        text += ["", f"{kind} (h_in x h_out):", "```", bench.HEADER]
        for tokens, adapters, rank, h_in, h_out in shapes:
            r = bench.case(kernels, h_in, h_out, torch.bfloat16, tokens, adapters, rank, 200, copy)
            rows[kind].append(r)
            text.append(f"{bench.row_text(r)}   {h_in}x{h_out}")
            ctx.report({"status": "FAIL", "partial": True, "summary": "measuring", "details": "\n".join(text)})
        text.append("```")
    worst = min(rows["decode"], key=lambda r: r["copy_fraction"])
    floors = [{"name": "decode kernels: achieved / copy bandwidth (worst shape)",
               "measured": f"{100 * worst['copy_fraction']:.0f}% ({worst['tokens']} tokens, rank {worst['rank']}, "
                           f"{worst['h_in']}x{worst['h_out']})", "required": f">= {100 * COPY_FLOOR:.0f}%",
               "ok": worst["copy_fraction"] >= COPY_FLOOR}]
    for kind, found in rows.items():
        slowest = max(found, key=lambda r: r["call_us"] / r["torch_us"])
        floors.append({"name": f"{kind} op: kernels vs PyTorch path, eager call (worst shape)",
                       "measured": f"{slowest['call_us']:.0f} us vs {slowest['torch_us']:.0f} us",
                       "required": "kernels faster", "ok": slowest["call_us"] < slowest["torch_us"]})
    return {"status": "PASS" if all(f["ok"] for f in floors) else "FAIL", "floors": floors,
            "summary": f"decode: {100 * worst['copy_fraction']:.0f}% of copy bandwidth at worst; "
                       f"copy {copy:.0f} GB/s", "details": "\n".join(text)}


ATTENTION = [(32, 1024), (32, 2048), (32, 4096), (64, 1024), (64, 2048), (64, 4096)]  # rows, context
AGREEMENT = 3e-2  # bf16: the kernel and SDPA differ by roundings only


def run_attention(ctx: Context) -> dict:
    """Decode attention per layer, bf16, Llama-3-8B heads: our paged kernel against the gather +
    SDPA path (bench.kernels.decode_attention), then compute-sanitizer on its tests."""
    import torch

    import bench.kernels.decode_attention as bench
    from bench.common.bandwidth import device_copy_gbs
    from multilora.kernels.loader import load_lora_kernels

    kernels = load_lora_kernels(torch.device("cuda"), "on")
    copy = device_copy_gbs()
    text = [f"Per layer, {bench.HEADS} heads / {bench.KV_HEADS} KV heads / d {bench.HEAD_DIM}, bf16, blocks of "
            f"{bench.BLOCK}; device-to-device copy {copy:.0f} GB/s in this run.", "", "```", bench.HEADER]
    found = []
    for rows, context in ATTENTION:
        found.append(bench.measure(kernels, rows, context, torch.bfloat16, copy))
        text.append(bench.row_text(found[-1]))
        ctx.report({"status": "FAIL", "partial": True, "summary": "measuring", "details": "\n".join(text + ["```"])})
        torch.cuda.empty_cache()
    text.append("```")
    slowest = min(found, key=lambda r: r["speedup"])
    worst_diff = max(r["max_diff"] for r in found)
    floors = [{"name": "decode attention per layer: paged kernel vs gather + SDPA (slowest case)",
               "measured": f"{slowest['kernel_us']:.0f} us vs {slowest['sdpa_us']:.0f} us ({slowest['rows']} rows, "
                           f"{slowest['context']} keys)", "required": "kernel faster", "ok": slowest["speedup"] > 1}]
    lines = [f"- kernel vs SDPA outputs: max |diff| {worst_diff:.2e} (allowed {AGREEMENT:g})"]
    ok = floors[0]["ok"] and worst_diff <= AGREEMENT
    for i, tool in enumerate(("memcheck", "racecheck")):
        passed, line = _sanitizer(ctx, tool, "sanitizer", ctx.left_s() / (2 - i) - 2,
                                  "tests/kernels/test_gpu_attention.py", "paged_")
        ok &= passed
        lines.append(f"- {line}")
        ctx.report({"status": "FAIL", "partial": True, "summary": "sanitizers", "floors": floors,
                    "details": "\n".join(text + [""] + lines)})
    best = max(found, key=lambda r: r["copy_fraction"])
    return {"status": "PASS" if ok else "FAIL", "floors": floors, "details": "\n".join(text + [""] + lines),
            "summary": f"kernel {slowest['speedup']:.2f}x the SDPA path at worst; up to "
                       f"{100 * best['copy_fraction']:.0f}% of copy bandwidth; " + "; ".join(
                           ln.lstrip("- ").split(";")[0] for ln in lines[1:])}
