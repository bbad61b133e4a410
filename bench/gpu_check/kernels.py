"""GPU check stages about our LoRA kernels: load (and the ptxas report), correctness (the gpu tests),
and speed. A dry run loads the CPU emulation instead (bench/gpu_check/emulation.py), whose "load"
names the PTX an H100/H200 takes, and times tiny shapes on the host clock.

Each `run_<stage>(ctx)` runs in its own process (python -m bench.gpu_check) and returns a stage
result (bench/gpu_check/harness.py).
"""
from __future__ import annotations

import importlib.util
import re
import time
import warnings
from pathlib import Path

from bench.common.paths import REPO
from bench.gpu_check.environment import find_tool
from bench.gpu_check.harness import Context, floors_status, run_limited, tail
from bench.gpu_check.sanitizers import PYTEST, pytest_counts

# tokens, adapters, rank, h_in, h_out: Llama-3-8B projections (a dry run: tiny ones on the emulation)
DECODE = [(64, 64, 16, 4096, 4096), (64, 64, 16, 4096, 14336), (64, 64, 16, 14336, 4096),
          (64, 64, 64, 4096, 4096), (32, 32, 16, 4096, 4096)]
PREFILL = [(2048, 4, 16, 4096, 4096), (2048, 4, 16, 4096, 14336), (2048, 1, 64, 4096, 4096)]
DRY_DECODE = [(4, 2, 8, 64, 96)]
DRY_PREFILL = [(24, 1, 8, 96, 64)]
COPY_FLOOR = 0.6


def load_kernels(ctx: Context):
    """Our kernels as the engine loads them (cuda_kernels=on), or their CPU emulation in a dry run."""
    if ctx.dry:
        from bench.gpu_check.emulation import EmulatedKernels

        return EmulatedKernels(ctx.work / "emulation")
    import torch

    from multilora.cuda.module import load_cuda_kernels

    return load_cuda_kernels(torch.device("cuda"), "on")


def copy_bandwidth(ctx: Context) -> float:
    """Device-to-device copy GB/s (a dry run: the host's, on a small buffer)."""
    from bench.common.bandwidth import device_copy_gbs, host_copy_gbs

    return host_copy_gbs(16) if ctx.dry else device_copy_gbs()


def _build_ptx():
    """kernels/build_ptx.py as a module (its ptxas runner and report parser)."""
    spec = importlib.util.spec_from_file_location("build_ptx", REPO / "kernels" / "build_ptx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ptxas_report(ctx: Context, ptx: Path, cc: str) -> tuple[list[str], int | None]:
    """(markdown lines, kernels that spill or use a stack; None when no report could be made).
    Any problem running or reading ptxas is said in the lines, never raised."""
    try:
        build_ptx = _build_ptx()
        exe = find_tool("ptxas") or build_ptx.find_ptxas()  # else the nvidia-cuda-nvcc wheel's
        if exe is None:
            return ["- ptxas: not found, registers not reported"], None
        report = build_ptx.parse_ptxas(build_ptx.run_ptxas(Path(exe), ptx, cc, ctx.out))
        if not report:
            return [f"- ptxas ({exe}): its output named no kernel"], None
        spills = [n for n, k in report.items() if k.get("spill_stores") or k.get("spill_loads") or k.get("stack")]
        return ["", f"`ptxas -v -arch={cc}` ({exe}):", "", build_ptx.report_table({cc: report})], len(spills)
    except Exception as exc:  # a ptxas problem is a finding of this report, not the end of the stage
        return [f"- ptxas report failed: {type(exc).__name__}: {str(exc)[:500]}"], None


def run_kernels(ctx: Context) -> dict:
    """Load with the JIT cache off (CUDA_CACHE_DISABLE): which PTX, how long, every kernel resolved,
    what cuda.bindings warned about; then ptxas -v on the same PTX."""
    from multilora.cuda import files

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        kernels = load_kernels(ctx)
        load_s = time.perf_counter() - started
        committed = files.PTX_NAME.fullmatch(kernels.ptx_source)  # else NVRTC compiled it at load
        ptx = files.available_ptx()[int(committed.group(1))] if committed else None
        names = re.findall(r"\.entry (\w+)\(", ptx.read_text()) if ptx else []
        started = time.perf_counter()
        for name in names:
            kernels.function(name)
        functions_s = time.perf_counter() - started
    cc = f"sm_{kernels.capability[0]}{kernels.capability[1]}"
    how = "CPU emulation (dry run)" if ctx.dry else "JIT (CUDA_CACHE_DISABLE=1)"
    facts = {"loaded": True, "ptx": kernels.ptx_source, "jit_s": load_s}
    details = [f"- PTX: {kernels.ptx_source} (ISA {kernels.ptx_isa[0]}.{kernels.ptx_isa[1]}) for {cc}, "
               f"{kernels.sm_count} SMs",
               f"- load, {how}: {load_s:.2f} s; {len(names)} kernels resolved in {functions_s:.3f} s"]
    details += [f"- warning at load: {w.category.__name__}: {w.message}" for w in caught] or ["- no warnings at load"]
    summary = f"{kernels.ptx_source} loaded in {load_s:.2f} s for {cc}"
    ctx.report({"status": "FAIL", "partial": True, "summary": summary, "facts": facts, "details": "\n".join(details)})
    lines, spilling = ptxas_report(ctx, Path(str(ptx)), cc) if ptx else (["- ptxas: no committed PTX loaded"], None)
    details += lines
    note = "ptxas: no report" if spilling is None else f"ptxas: {spilling} kernels spill" if spilling else \
        "ptxas: no spills"
    return {"status": "FAIL" if spilling else "PASS", "facts": facts, "summary": f"{summary}; {note}",
            "details": "\n".join(details)}


def run_correctness(ctx: Context) -> dict:
    """The gpu tests of tests/cuda: the kernels against a float64 reference (skipped on a CPU)."""
    code, out = run_limited([*ctx.python, *PYTEST, "tests/cuda"], ctx.left_s() - 5,
                            log=ctx.out / "pytest-kernels.log")
    counts = pytest_counts(out) if code is not None else "timed out"
    lines = [f"- `pytest -m gpu tests/cuda`: {counts}"]
    if code != 0:
        lines += ["", "```", tail(out, 40), "```"]
    status = "PASS" if code == 0 else "INCOMPLETE" if code is None else "FAIL"
    return {"status": status, "summary": counts, "details": "\n".join(lines)}


def run_kernel_speed(ctx: Context) -> dict:
    """bench.kernels.lora_bandwidth's cases on Llama-3-8B decode and prefill shapes, in bf16."""
    import torch

    import bench.kernels.lora_bandwidth as bench

    kernels = load_kernels(ctx)
    copy = copy_bandwidth(ctx)
    device, iters = ("cpu", 2) if ctx.dry else ("cuda", 200)
    shapes = (("decode", DRY_DECODE), ("prefill", DRY_PREFILL)) if ctx.dry else (("decode", DECODE),
                                                                                ("prefill", PREFILL))
    rows: dict[str, list[dict]] = {"decode": [], "prefill": []}
    text = [f"{'Host' if ctx.dry else 'Device-to-device'} copy: {copy:.0f} GB/s (read + write), measured in "
            "this run."]
    for kind, cases in shapes:
        text += ["", f"{kind} (h_in x h_out):", "```", bench.HEADER]
        for tokens, adapters, rank, h_in, h_out in cases:
            r = bench.case(kernels, h_in, h_out, torch.bfloat16, tokens, adapters, rank, iters, copy, device)
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
    return {"status": floors_status(floors, ctx), "floors": floors,
            "summary": f"decode: {100 * worst['copy_fraction']:.0f}% of copy bandwidth at worst; "
                       f"copy {copy:.0f} GB/s", "details": "\n".join(text)}
