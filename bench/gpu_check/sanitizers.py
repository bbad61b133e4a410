"""The GPU check's compute-sanitizer stage: memcheck and racecheck on the `sanitizer_*` tests of our
LoRA and paged-attention kernels, four runs at once, each under its own fixed budget.

What counts is the kernels' own errors: the sanitizer runs with `--report-api-errors no` (torch and
cuda-bindings provoke CUDA API errors on purpose while probing, which the default `explicit` would
report and count) and only on our kernels (`--kernel-name kns=<prefix>`); its ERROR SUMMARY (or
racecheck's RACECHECK SUMMARY) is parsed for the number of errors. The tests' own result is the
pytest exit code, which compute-sanitizer passes through. A run out of its budget is reported as
inconclusive, apart from a failure. A dry run without the tool runs the same pytest commands bare.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.gpu_check.environment import find_tool
from bench.gpu_check.harness import Context, child_env, run_limited
from bench.gpu_check.stages import SANITIZER_BUDGET_S

PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE"]


@dataclass(frozen=True)
class SanitizerRun:
    tool: str  # memcheck | racecheck
    tests: str  # a test file
    select: str  # pytest -k
    kernels: str  # kernel name prefix the tool checks

    @property
    def name(self) -> str:
        return f"{self.tool} {self.kernels.rstrip('_')}"


RUNS = (
    SanitizerRun("memcheck", "tests/cuda/test_gpu_kernels.py", "sanitizer", "lora_"),
    SanitizerRun("racecheck", "tests/cuda/test_gpu_kernels.py", "sanitizer and not gate_up", "lora_"),
    SanitizerRun("memcheck", "tests/cuda/test_gpu_attention.py", "sanitizer", "paged_"),
    SanitizerRun("racecheck", "tests/cuda/test_gpu_attention.py", "sanitizer", "paged_"),
)


def pytest_counts(output: str) -> str:
    """pytest's final counts line ("3 passed, 1 skipped in 2.1s"), or why there is none."""
    lines = [ln for ln in output.splitlines() if "SUMMARY:" not in ln  # not the sanitizer's own
             and re.search(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary"


def kernel_errors(output: str) -> int | None:
    """Errors in the sanitizer's last summary line (memcheck's ERROR SUMMARY, racecheck's RACECHECK
    SUMMARY); None when it printed none (it did not get to the end)."""
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: .*?\((\d+) errors?", output)
    if not found:
        return None
    memcheck, racecheck = found[-1]
    return int(memcheck or racecheck)


def verdict(run: SanitizerRun, code: int | None, output: str, sanitized: bool, budget_s: float) -> tuple[str, str]:
    """(PASS | FAIL | INCOMPLETE, one line) for one run. FAIL: kernel errors, failed tests, or
    tests that no longer match the selection (a harness error); INCOMPLETE: out of time."""
    tests = pytest_counts(output)
    if code is None:
        return "INCOMPLETE", f"{run.name}: out of its {budget_s:.0f} s budget (inconclusive, not a failure); {tests}"
    if code == 5:
        return "FAIL", f"{run.name}: -k '{run.select}' selects no test in {run.tests} (harness error)"
    if not sanitized:
        return ("PASS" if code == 0 else "FAIL"), f"{run.name}: without compute-sanitizer (dry run): {tests}"
    errors = kernel_errors(output)
    if errors is None:
        return "FAIL", f"{run.name}: no sanitizer summary (exit {code}); {tests}"
    ok = errors == 0 and code == 0
    return ("PASS" if ok else "FAIL"), f"{run.name}: {errors} kernel errors; tests: {tests}"


def sanitizer_command(exe: str | None, run: SanitizerRun, python: list[str], options: bool = True) -> list[str]:
    """The run's pytest command under `exe` (None: bare); `options`: count our kernels' errors only."""
    tests = [*python, *PYTEST, run.tests, "-k", run.select]
    if exe is None:
        return tests
    extra = ["--report-api-errors", "no", "--kernel-name", f"kns={run.kernels}"] if options else []
    return [exe, "--tool", run.tool, *extra, *tests]


def _one(ctx: Context, exe: str | None, run: SanitizerRun, budget_s: float) -> tuple[str, str]:
    # No torch caching allocator: each tensor its own allocation, so memcheck sees every stray byte.
    env = child_env({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    log = ctx.out / f"sanitizer-{run.tool}-{run.kernels.rstrip('_')}.log"
    code, out = run_limited(sanitizer_command(exe, run, ctx.python), budget_s, env, log)
    refused = code is not None and pytest_counts(out) == "no pytest summary" and kernel_errors(out) is None
    if exe and refused:  # the tool ran nothing (an option this version lacks?): once more without ours
        why = next((ln.strip() for ln in out.splitlines() if ln.strip()), f"exit {code}")[:200]
        code, out = run_limited(sanitizer_command(exe, run, ctx.python, options=False), budget_s / 2, env, log)
        status, line = verdict(run, code, out, True, budget_s / 2)
        return status, f"{line} (rerun without --report-api-errors / --kernel-name, refused with: {why})"
    return verdict(run, code, out, exe is not None, budget_s)


def run_sanitizers(ctx: Context) -> dict:
    exe = find_tool("compute-sanitizer")
    if exe is None and not ctx.dry:
        return {"status": "INCOMPLETE", "summary": "compute-sanitizer not found: memcheck and racecheck not run",
                "details": "- compute-sanitizer: not on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin"}
    budget = min(SANITIZER_BUDGET_S, ctx.left_s() - 5)
    with ThreadPoolExecutor(len(RUNS)) as pool:
        outcomes = list(pool.map(lambda run: _one(ctx, exe, run, budget), RUNS))
    statuses = {status for status, _ in outcomes}
    status = "FAIL" if "FAIL" in statuses else "INCOMPLETE" if "INCOMPLETE" in statuses else "PASS"
    lines = [f"- {status_}: {line}" for status_, line in outcomes]
    tool = exe or "not found (dry run: the pytest commands alone)"
    head = f"- tool: {tool}; {budget:.0f} s per run, {len(RUNS)} at once"
    return {"status": status, "details": "\n".join([head, *lines]),
            "summary": "; ".join(f"{line.split(':')[0]} {status_}" for status_, line in outcomes)}
