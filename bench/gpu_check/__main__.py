"""`make gpu-check`: one prepared run that proves the GPU path (the stages' limits add up to TOTAL_S).

    PYTHONPATH=backend_src python3 -m bench.gpu_check [--out docs/gpu.md] [--out-dir DIR] [--work DIR]
    PYTHONPATH=backend_src python3 -m bench.gpu_check --dry-run     # make gpu-check-dry: on the CPU

Made for a bare GPU machine and its own python3 (torch, transformers, peft, safetensors,
cuda-bindings, pytest; no network, nothing installable, no tritonserver). Each stage
(bench/gpu_check/stages.py) runs in its own process under its own time limit, killed with its
children when over; a stage that fails, crashes or times out is reported and the next one runs.
Results, logs and a report written after every stage go to --out-dir (one copy brings them all
back); the report also goes to --out (docs/gpu.md) at the end. With a driver present, a stage that
finds CUDA unusable (or runs out of time finding out) fails the run: written down, exit code 1.
Without a driver the GPU stages are skipped with the reason, docs/gpu.md is left alone, exit 0.

--dry-run runs every stage's harness on this machine's CPU (small shapes, the kernels on their CPU
emulation, timings that are not GPU figures) and writes its report only into --out-dir, never
docs/gpu.md; it exits 1 when any stage does not pass.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from bench.common.paths import DOCS
from bench.gpu_check import report
from bench.gpu_check.environment import driver_signs
from bench.gpu_check.harness import (
    FAILED,
    Context,
    child_env,
    outcome,
    python_command,
    read_result,
    run_limited,
    tail,
    write_result,
)
from bench.gpu_check.stages import STAGES, TOTAL_S, Stage, satisfied

DEFAULT_WORK = Path(tempfile.gettempdir()) / "multilora-gpu-check"  # the 8B-shaped model is kept here
DEFAULT_DRY_WORK = Path(tempfile.gettempdir()) / "multilora-gpu-check-dry"
DRY_WORKERS = 3
# A dry run's stages get this many times their GPU limits: a shared CPU is slower than the GPU machine,
# and the dry run proves the harness, not the GPU run's budget.
DRY_LIMIT_FACTOR = 10


def run_stage(stage: Stage, work: Path, out: Path, device: str, dry: bool) -> dict:
    """The stage in a child process under its limit; its saved result, or why there is none."""
    result_path, log = out / f"{stage.name}.json", out / f"{stage.name}.log"
    result_path.unlink(missing_ok=True)
    limit = stage.limit_s * (DRY_LIMIT_FACTOR if dry else 1)
    cmd = [*python_command(), "-m", "bench.gpu_check", "--stage", stage.name, "--work", str(work), "--out-dir",
           str(out), "--device", device, "--limit", str(limit), *(["--dry"] if dry else [])]
    started = time.monotonic()
    code, output = run_limited(cmd, limit, child_env(stage.env), log=log)
    result = outcome(read_result(result_path), code, limit)
    if result["status"] != "PASS":
        result["details"] = (result.get("details", "") + f"\n\nLast output ({log}):\n```\n{tail(output)}\n```").strip()
    result["seconds"], result["limit_s"] = round(time.monotonic() - started, 1), limit
    return result


def stage_child(args: argparse.Namespace) -> None:
    """Inside the child: run one stage function, save what it returns, and leave at once: a thread
    left running or a slow driver teardown must not keep a saved result past the stage's limit."""
    stage = next(s for s in STAGES if s.name == args.stage)
    ctx = Context(args.work, args.out_dir, args.device, args.limit, args.out_dir / f"{stage.name}.json", args.dry)
    try:
        result = getattr(importlib.import_module(f"bench.gpu_check.{stage.module}"), f"run_{stage.name}")(ctx)
    except Exception as exc:  # a stage's crash is its result, never the run's end
        result = {"status": "FAIL", "summary": f"{type(exc).__name__}: {str(exc)[:300]}",
                  "details": f"```\n{traceback.format_exc()}\n```"}
    write_result(ctx.result_path, result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_gpu_run(results: dict[str, dict], dry: bool) -> bool:
    """Whether this run's results are to be written: a dry run, usable CUDA, or a driver that is
    present (then CUDA not being usable is the finding)."""
    facts = results.get("env", {}).get("facts", {})
    return dry or bool(facts.get("cuda_usable") or facts.get("driver_signs") or driver_signs())


def skip_reason(stage: Stage, results: dict[str, dict], selected: set[str] | None, dry: bool) -> str | None:
    if selected is not None and stage.name not in selected:
        return "not selected (--stages)"
    return next((why for need in stage.needs if (why := satisfied(need, results, dry))), None)


def run_all(work: Path, out: Path, dry: bool, selected: set[str] | None) -> dict[str, dict]:
    """Every stage in order, each once the stages it needs have ended. On the GPU one at a time (they
    share the GPU, and its timings must be alone); a dry run's timings judge nothing, so there
    stages whose needs have ended run up to DRY_WORKERS at once."""
    started = time.monotonic()
    results: dict[str, dict] = {}
    pending, running = list(STAGES), {}
    workers = DRY_WORKERS if dry else 1
    with ThreadPoolExecutor(workers) as pool:
        while pending or running:
            for stage in [s for s in pending if all(n in results for n in s.needs)]:
                if len(running) >= workers:
                    break
                pending.remove(stage)
                if (reason := skip_reason(stage, results, selected, dry)) is not None:
                    results[stage.name] = {"status": "SKIP", "summary": reason}
                    print(report.progress_line(stage, results[stage.name], time.monotonic() - started), flush=True)
                    continue
                if is_gpu_run(results, dry) and results:  # a report now, in case the run is cut short
                    now_running = ", ".join(s.title for s in [*running.values(), stage])
                    (out / "gpu.md").write_text(report.markdown(list(STAGES), results, report.floors(results),
                                                                _now(), dry, running=now_running))
                running[pool.submit(run_stage, stage, work, out, "cpu" if dry else "cuda", dry)] = stage
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                results[stage.name] = future.result()
                print(report.progress_line(stage, results[stage.name], time.monotonic() - started), flush=True)
    return results


def outputs_text(out: Path, work: Path, written: list[Path]) -> str:
    return "\n".join([
        "Outputs:",
        *(f"  report:             {path}" for path in written),
        f"  stage results:      {out}/<stage>.json ({', '.join(s.name for s in STAGES)})",
        f"  logs:               {out}/<stage>.log, {out}/pytest-kernels.log, {out}/sanitizer-*.log",
        f"  kept for reuse (not outputs): {work} (the demo and the 8B-shaped model)",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS / "gpu.md", help="the report of a GPU run")
    parser.add_argument("--out-dir", type=Path, help="stage results, logs and the report (default: WORK/out)")
    parser.add_argument("--work", type=Path, help=f"models kept between runs (default: {DEFAULT_WORK})")
    parser.add_argument("--dry-run", action="store_true", help="run every stage's harness on the CPU")
    parser.add_argument("--stages", help="comma-separated stage names to run (env always runs)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage_child(args)
    dry = args.dry_run
    work = args.work or (DEFAULT_DRY_WORK if dry else DEFAULT_WORK)
    out = args.out_dir or work / "out"
    for folder in (work, out):
        folder.mkdir(parents=True, exist_ok=True)
    selected = None if args.stages is None else {"env", *args.stages.split(",")}
    if selected is not None and (unknown := selected - {s.name for s in STAGES}):
        parser.error(f"unknown stages {sorted(unknown)}; the stages: {', '.join(s.name for s in STAGES)}")
    print(f"GPU check{' (dry run on the CPU)' if dry else ''}: {len(STAGES)} stages, at most {TOTAL_S} s", flush=True)
    results = run_all(work, out, dry, selected)
    floors = report.floors(results)
    print(report.summary(list(STAGES), results, floors, dry))
    if not is_gpu_run(results, dry):
        print(f"\nNo GPU run: {args.out} is left as it is.")  # no driver on this machine
        return 0
    text = report.markdown(list(STAGES), results, floors, _now(), dry)
    written = [out / "gpu.md"] if dry else [args.out, out / "gpu.md"]
    for path in written:
        path.write_text(text)
    print("\n" + outputs_text(out, work, written))
    failed = [s.title for s in STAGES if results[s.name]["status"] in FAILED]
    if dry:
        failed += [s.title for s in STAGES if results[s.name]["status"] == "SKIP" and selected is None]
        print(f"\nDry run: {'harness problems in ' + ', '.join(failed) if failed else 'every stage passed'}.")
        return 1 if failed else 0
    return 1 if failed or not all(f["ok"] for f in floors) else 0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


if __name__ == "__main__":
    sys.exit(main())
