"""What the GPU check's runner and its stages share: the stage context, stage results written
atomically and read back guarded, and commands run under a time limit (the whole process group
killed when over).

A stage result is a dict: "status" (one of STATUSES), "summary" (one line), "details" (markdown),
"facts" (values other stages or the report read), "floors" (checked requirements) and, when the
harness itself failed rather than the thing measured, "harness_error" (why). "partial": True
marks what a stage saved on its way, in case it is killed before its end.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.paths import REPO

# PASS / FAIL: the stage ran and its checks held or not. TIMEOUT: killed at its limit. INCOMPLETE: it
# ended, but a check in it ran out of its own budget (inconclusive, apart from a failure). SKIP: not run.
STATUSES = ("PASS", "FAIL", "TIMEOUT", "INCOMPLETE", "SKIP")
FAILED = ("FAIL", "TIMEOUT", "INCOMPLETE")


@dataclass
class Context:
    """What a stage gets: where to keep files, the device, its time limit, how to run Python.

    `work` keeps what is reused between runs (models); `out` is where logs and results go (the
    folder one copy brings back). `dry`: a CPU run of the harness (small shapes, kernels on their
    CPU emulation, timings that are not GPU figures)."""

    work: Path
    out: Path
    device: str
    limit_s: float
    result_path: Path
    dry: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def python(self) -> list[str]:
        return python_command()

    def left_s(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)

    def report(self, result: dict) -> None:
        """Save a (partial) result now: if the stage is killed later, this much is reported."""
        write_result(self.result_path, result)


def floors_status(floors: list[dict], ctx: Context) -> str:
    """PASS when every floor holds; a dry run's figures are not GPU figures and judge nothing."""
    return "PASS" if ctx.dry or all(f["ok"] for f in floors) else "FAIL"


def write_result(path: Path, result: dict) -> None:
    """Write a stage result so that a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: Path) -> dict:
    """A stage's saved result; a missing, unreadable or malformed one reads as a failed stage
    ("stage failed: <why>") with a harness_error, never as an exception in the runner."""
    def failed(why: str) -> dict:
        return {"status": "FAIL", "summary": f"stage failed: {why}", "harness_error": why}

    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return failed("it saved no result")
    except (OSError, ValueError) as exc:
        return failed(f"its result {path.name} is unreadable ({type(exc).__name__}: {exc})")
    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        return failed(f"its result {path.name} has no valid status")
    return result


def outcome(saved: dict, code: int | None, limit_s: float) -> dict:
    """A stage's result from what it saved (read_result) and how its process ended (exit code, None:
    killed at `limit_s`). What a stage saved on its way (its facts: the environment's driver signs)
    is kept in every case."""
    if code is None and not saved.get("partial") and "harness_error" not in saved:  # killed after its end
        return {**saved, "summary": f"{saved['summary']} (its process was killed at the {limit_s:.0f} s limit "
                                    "after saving this)"}
    if code is None:
        last = "nothing saved" if "harness_error" in saved else f"last saved: {saved.get('summary', '')}"
        result = {**saved, "status": "TIMEOUT", "summary": f"over its {limit_s:.0f} s limit; {last}"}
        result.pop("harness_error", None)
        result.pop("partial", None)
        return result
    if "harness_error" in saved:
        return {**saved, "summary": f"{saved['summary']} (exit code {code})"}
    if saved.get("partial"):
        result = {**saved, "status": "FAIL",
                  "summary": f"stage failed: it exited with code {code} before its end; last saved: {saved['summary']}"}
        result.pop("partial")
        return result
    return saved


def python_command() -> list[str]:
    """This interpreter, with -S passed on (a test runs the no-torch path that way)."""
    return [sys.executable, *(["-S"] if sys.flags.no_site else [])]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage or test process: backend_src importable, output unbuffered."""
    path = os.pathsep.join(p for p in (str(REPO / "backend_src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_limited(cmd: list[str], limit_s: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> tuple[int | None, str]:
    """Run `cmd` from the repository root; kill its whole process group after `limit_s`.

    Returns (exit code or None on timeout, combined output); the output also goes to `log`."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        out.seek(0)
        text = out.read()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    return code, text


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


GRAPHS_LOGGER = "multilora.engine.cuda_graphs"  # says at engine start whether decode runs from CUDA graphs


@contextlib.contextmanager
def log_messages(name: str) -> Iterator[list[str]]:
    """The messages (INFO and up) logger `name` emits inside the block: what an engine tells its
    operator, e.g. whether its decode steps got CUDA graphs (GRAPHS_LOGGER)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
