"""What the GPU check's runner and its stages share: the stage context, and running a command
under a time limit with its whole process group killed when over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.paths import REPO


@dataclass
class Context:
    """What a stage gets: where to keep files, the device, its time limit, how to run Python."""

    work: Path
    device: str
    limit_s: float
    result_path: Path
    small: bool = False  # tiny shapes: the CPU dry run of the tests
    started: float = field(default_factory=time.monotonic)

    @property
    def python(self) -> list[str]:
        return python_command()

    def left_s(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)

    def report(self, result: dict) -> None:
        """Save a (partial) result now: if the stage is killed later, this much is reported."""
        self.result_path.write_text(json.dumps(result, default=str))


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

    Returns (exit code or None on timeout, combined output)."""
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
        log.write_text(text)
    return code, text


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
