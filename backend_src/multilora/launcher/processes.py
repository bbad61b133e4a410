"""What /proc says about tritonserver's child processes (Linux).

The python backend of tritonserver 2.51 never notices that a stub died: it does not reap it
(the stub stays a zombie child of the server), keeps the model READY, and answers every new
request with `Stub process '<instance>' is not healthy.`. A zombie stub is therefore the
definite sign that a model instance is gone. (From 26.01 the backend reaps the stub when
readiness is asked, and from 26.04 `/v2/health/ready` reports it; the supervisor watches both.)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROC = Path("/proc")
# /proc/<pid>/stat truncates the command name to 15 characters.
STUB_COMM = "triton_python_backend_stub"[:15]


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # R, S, D, Z (zombie), ...
    comm: str


def read_proc(pid: int, proc: Path = PROC) -> Proc | None:
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ')'.
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return Proc(pid=pid, ppid=int(fields[1]), state=fields[0], comm=head.partition("(")[2])


def children(pid: int, proc: Path = PROC) -> list[Proc]:
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            info = read_proc(int(entry.name), proc)
            if info is not None and info.ppid == pid:
                found.append(info)
    return found


def dead_stubs(server_pid: int, proc: Path = PROC) -> list[int]:
    """Python backend stubs of `server_pid` that have exited but were not reaped."""
    return [c.pid for c in children(server_pid, proc) if c.comm == STUB_COMM and c.state == "Z"]


def reap_adopted_zombies(own: set[int], proc: Path = PROC) -> None:
    """As PID 1 (the launcher as a container's command) we inherit the orphans of a killed
    server; reap those, and leave our own children to subprocess, which waits for them."""
    if os.getpid() != 1:
        return
    for child in children(1, proc):
        if child.state == "Z" and child.pid not in own:
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pass
