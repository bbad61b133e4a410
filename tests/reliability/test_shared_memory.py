"""Issue 10 item 13 (part): a crashed server leaves its python backend regions in /dev/shm; the
launcher removes its own servers' regions after they are gone, and never another server's."""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from multilora.launcher import shm

pytestmark = pytest.mark.e2e


def test_regions_of_a_crashed_server_are_removed_and_others_kept(make_server, wait_until):
    foreign = shm.SHM_DIR / f"triton_python_backend_shm_region_{uuid.uuid4()}"  # another server's
    foreign.write_bytes(b"not ours")
    try:
        server = make_server(exit_timeout_secs=1)
        server.start()
        ours = list(shm.SHM_DIR.glob(server.shm_prefix + "*"))
        assert len(ours) == 1, "one region for the one lora_llm instance, named with our prefix"
        os.kill(server.process.pid, signal.SIGKILL)  # the crash: nothing of Triton's cleans up
        wait_until(lambda: server.process.poll() is not None, 10, "tritonserver is gone")
        assert ours[0].exists(), "a crashed tritonserver leaves its region behind"
        server.stop()  # what the supervisor and the launcher's exit do
        assert not list(shm.SHM_DIR.glob(server.shm_prefix + "*"))
        assert foreign.read_bytes() == b"not ours"
    finally:
        foreign.unlink(missing_ok=True)
