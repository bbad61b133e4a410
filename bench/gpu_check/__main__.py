"""`make gpu-check`: one prepared run that proves the GPU path, in at most 8 minutes.

    PYTHONPATH=backend_src python3 -m bench.gpu_check [--out docs/gpu.md] [--work DIR]

Made for a bare GPU machine and its own python3 (torch, transformers, peft, safetensors,
cuda-bindings, pytest; no network, nothing installable, no tritonserver). Each stage runs in its
own process under its own time limit, killed with its children when over; a stage that fails,
crashes or times out is reported and the next one runs. The summary is printed last and, when a
GPU was found, written to docs/gpu.md with every measurement and floor. Without a usable GPU the
GPU stages are skipped with the reason, docs/gpu.md is left alone, and the exit code is 0.
The stages are `run_<stage>(ctx)` in bench/gpu_check/kernels.py, engine.py and speed.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.paths import DOCS
from bench.gpu_check import report
from bench.gpu_check.harness import Context, child_env, python_command, run_limited, tail

BUDGET_S = 470  # the whole run, stages and report, stays under 8 minutes
MIN_STAGE_S = 10
DEFAULT_WORK = Path(tempfile.gettempdir()) / "multilora-gpu-check"  # the 8B-shaped model is kept here


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    limit_s: int
    title: str
    needs: tuple[str, ...] = ("env",)  # stages that must have passed first
    env: dict[str, str] = field(default_factory=dict)


STAGES = (
    Stage("env", "bench.gpu_check.kernels", 15, "environment", needs=()),
    Stage("kernels", "bench.gpu_check.kernels", 30, "kernel load", env={"CUDA_CACHE_DISABLE": "1"}),
    Stage("correctness", "bench.gpu_check.kernels", 110, "kernel correctness"),
    Stage("kernel_speed", "bench.gpu_check.kernels", 45, "kernel speed", needs=("env", "kernels")),
    Stage("engine", "bench.gpu_check.engine", 70, "engine on CUDA"),
    Stage("model", "bench.gpu_check.speed", 90, "8B-shaped model"),
    Stage("speed_on", "bench.gpu_check.speed", 70, "engine speed, kernels", needs=("env", "model")),
    Stage("speed_off", "bench.gpu_check.speed", 40, "engine speed, PyTorch path", needs=("env", "model")),
    # Last, so that it only uses what the stages above leave of the budget.
    Stage("attention", "bench.gpu_check.kernels", 70, "decode attention", needs=("env", "kernels")),
)


def run_stage(stage: Stage, limit_s: float, work: Path, device: str, small: bool) -> dict:
    """The stage in a child process; its saved result, or why there is none."""
    result_path = work / f"{stage.name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [*python_command(), "-m", "bench.gpu_check", "--stage", stage.name, "--work", str(work),
           "--device", device, "--limit", str(int(limit_s)), *(["--small"] if small else [])]
    started = time.monotonic()
    code, output = run_limited(cmd, limit_s, child_env(stage.env), log=work / f"{stage.name}.log")
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if code is None:
        result.update(status="TIMEOUT", summary=f"over its {limit_s:.0f} s limit; "
                      + result.get("summary", "nothing measured"))
        result["details"] = result.get("details", "") + f"\n\nLast output:\n```\n{tail(output)}\n```"
    elif not result or result.get("partial"):
        result = {**result, "status": "FAIL", "summary": f"the stage exited with code {code} before its end",
                  "details": result.get("details", "") + f"\n\nLast output:\n```\n{tail(output)}\n```"}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def stage_child(args: argparse.Namespace) -> int:
    """Inside the child: run one stage function and save what it returns."""
    stage = next(s for s in STAGES if s.name == args.stage)
    ctx = Context(Path(args.work), args.device, args.limit, Path(args.work) / f"{stage.name}.json", args.small)
    try:
        result = getattr(importlib.import_module(stage.module), f"run_{stage.name}")(ctx)
    except Exception as exc:  # a stage's crash is its result, never the run's end
        result = {"status": "FAIL", "summary": f"{type(exc).__name__}: {str(exc)[:300]}",
                  "details": f"```\n{traceback.format_exc()}\n```"}
    ctx.report(result)
    return 0


def skip_reason(stage: Stage, results: dict[str, dict]) -> str | None:
    for need in stage.needs:
        done = results.get(need, {})
        if need == "env" and not done.get("facts", {}).get("cuda_usable"):
            return "no usable CUDA: " + done.get("summary", "the environment stage did not run")
        if need != "env" and done.get("status") != "PASS":
            return f"needs the {need} stage, which ended {done.get('status', 'unrun')}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS / "gpu.md")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--device", default="cuda", help="cpu: run one --stage on the CPU (a dry run)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return stage_child(args)
    started = time.monotonic()
    results: dict[str, dict] = {}
    for stage in STAGES:
        left = BUDGET_S - (time.monotonic() - started)
        reason = skip_reason(stage, results)
        if reason is None and left < MIN_STAGE_S:
            reason = f"the run's {BUDGET_S} s budget is spent"
        if reason is not None:
            results[stage.name] = {"status": "SKIP", "summary": reason}
        else:
            results[stage.name] = run_stage(stage, min(stage.limit_s, left), args.work, args.device, args.small)
        print(report.progress_line(stage, results[stage.name], time.monotonic() - started), flush=True)
    floors = report.floors(results)
    print(report.summary(STAGES, results, floors))
    if not results["env"].get("facts", {}).get("cuda_usable"):
        print(f"\nNo GPU run: {args.out} is left as it is.")
        return 0
    args.out.write_text(report.markdown(STAGES, results, floors, datetime.datetime.now(datetime.timezone.utc)))
    print(f"\nWrote {args.out}")
    failed = [n for n, r in results.items() if r["status"] in ("FAIL", "TIMEOUT")]
    return 1 if failed or not all(f["ok"] for f in floors) else 0


if __name__ == "__main__":
    sys.exit(main())
