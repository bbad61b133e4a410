"""Issue 10 item 3: a killed python backend stub must be visible and must not be permanent.

tritonserver 2.51 keeps `/v2/health/ready` at 200 with a dead stub, never answers the streams
that were in flight and refuses every new request. The health check sends a real request, and
the supervisor restarts the server: in-flight clients get an error, the model serves again.
`pytest -s` prints the measured times (docs/reliability.md, "Backend process crash").
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from multilora.launcher import probes, processes, shm

pytestmark = pytest.mark.e2e
STREAMS = 8


def health(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multilora.launcher.health", "--url", url, "--timeout", "10"],
                          capture_output=True, text=True, timeout=60)


def test_health_check_fails_while_the_stub_is_dead(make_server, kill_stub, wait_until):
    with make_server(exit_timeout_secs=1) as server:
        ok = health(server.url)
        assert ok.returncode == 0 and "healthy: lora_llm generated a token" in ok.stdout, ok.stderr
        kill_stub(server)
        wait_until(lambda: server.dead_stubs(), 10, "the stub shows as dead")
        sick = health(server.url)
        assert sick.returncode == 1
        assert "Stub process 'lora_llm_0_0' is not healthy" in sick.stderr, sick.stderr


def test_supervisor_ends_inflight_streams_with_an_error_and_serves_again(supervised_server, open_streams, kill_stub,
                                                                          wait_until):
    server, supervisor = supervised_server
    streams = open_streams(server.grpc_url, STREAMS)
    wait_until(lambda: all(s.responses for s in streams), 60, "every stream has its first tokens")
    first_pid = server.process.pid
    killed_at = time.monotonic()
    kill_stub(server)

    wait_until(lambda: all(s.error for s in streams), 10, "every in-flight stream got an error")
    errors_after = max(s.error_at for s in streams) - killed_at
    wait_until(lambda: probes.generate_once(server.url, "lora_llm", timeout=5) is None, 120,
               "lora_llm serves again")
    recovered_after = time.monotonic() - killed_at

    assert server.process.pid != first_pid and supervisor.restarts == 1
    assert all(s.responses < 2000 for s in streams)
    regions = list(shm.SHM_DIR.glob(server.shm_prefix + "*"))
    assert len(regions) == 1, f"the dead server's region is removed, the new one's stays: {regions}"
    assert processes.dead_stubs(server.process.pid) == []
    print(f"\n{STREAMS} in-flight streams all got an error {errors_after:.2f} s after kill -9 of the stub "
          f"(first: {min(s.error_at for s in streams) - killed_at:.2f} s); lora_llm served again "
          f"{recovered_after:.1f} s after it (the server's first start took {server.startup_seconds:.1f} s)."
          f"\nthe clients saw: {streams[0].error[:200]}")
