"""`multilora.launcher.processes`: a dead python backend stub is seen in /proc."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from multilora.launcher import processes


def fake_proc(root: Path, pid: int, comm: str, state: str, ppid: int) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} {ppid} 1 1 0 -1 4194304 0 0\n")


def test_zombie_stubs_of_that_server_only(tmp_path):
    fake_proc(tmp_path, 10, "tritonserver", "S", 1)
    fake_proc(tmp_path, 11, "triton_python_b", "Z", 10)   # dead stub of server 10
    fake_proc(tmp_path, 12, "triton_python_b", "S", 10)   # a live one
    fake_proc(tmp_path, 13, "triton_python_b", "Z", 99)   # another server's
    fake_proc(tmp_path, 14, "sh (x) y", "Z", 10)          # odd command names parse
    (tmp_path / "self").mkdir()
    assert processes.dead_stubs(10, tmp_path) == [11]
    assert processes.read_proc(14, tmp_path).comm == "sh (x) y"
    assert processes.read_proc(99, tmp_path) is None


def test_a_real_child_that_died_unreaped_is_a_zombie(tmp_path):
    # A copy named like the stub, so /proc shows the same command name.
    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("sleep"), stub)
    child = subprocess.Popen([stub, "30"])
    try:
        assert processes.dead_stubs(os.getpid()) == []
        child.kill()
        deadline = time.monotonic() + 5
        while processes.dead_stubs(os.getpid()) != [child.pid] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes.dead_stubs(os.getpid()) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert processes.dead_stubs(os.getpid()) == []


def test_as_pid_1_it_reaps_adopted_zombies_but_not_its_own_children(tmp_path, monkeypatch):
    fake_proc(tmp_path, 20, "triton_python_b", "Z", 1)   # orphan of a killed server: reaped
    fake_proc(tmp_path, 21, "python3", "Z", 1)           # our own gateway: subprocess waits for it
    fake_proc(tmp_path, 22, "tritonserver", "S", 1)      # running: left alone
    reaped = []
    monkeypatch.setattr(os, "waitpid", lambda pid, flags: reaped.append(pid) or (pid, 0))
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    processes.reap_adopted_zombies({21}, tmp_path)
    assert reaped == [], "not PID 1: orphans are init's"
    monkeypatch.setattr(os, "getpid", lambda: 1)
    processes.reap_adopted_zombies({21}, tmp_path)
    assert reaped == [20]
