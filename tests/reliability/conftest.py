"""Fixtures for the reliability suite: a copy of lora_llm on the demo model, gRPC streams to
watch, and the python backend stub to kill. Every test that kills or stops a server starts its
own (make_server); the tests that only send requests share one (server). All listen on loopback
with free ports, and every wait is bounded."""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from multilora.launcher import TritonServer, processes
from serving_kit import TOKEN, TOKEN_VARIABLE, copy_lora_repo

# The shared server requires a management token (serving_kit.TOKEN) for load and unload
# (test_request_surface.py), and ends what test_abandoned_generate.py's clients leave after this.
REQUEST_TIMEOUT_S = 3


@pytest.fixture(scope="session")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that only send requests (test_request_surface.py,
    test_abandoned_generate.py), with the settings above."""
    repo = copy_lora_repo(tmp_path_factory.mktemp("shared_repository"), demo_dir,
                          management_token_env=TOKEN_VARIABLE, request_timeout_s=str(REQUEST_TIMEOUT_S))
    running = TritonServer(repo, log_path=tmp_path_factory.mktemp("shared_server") / "tritonserver.log",
                           exit_timeout_secs=3)
    running.env[TOKEN_VARIABLE] = TOKEN
    with running:
        yield running


@pytest.fixture
def lora_repo(demo_dir: Path, tmp_path: Path) -> Path:
    """Per test (a copy costs milliseconds): a session-wide one would tie every test that starts a
    server to one xdist worker (tests/support/worker_groups.py)."""
    return copy_lora_repo(tmp_path / "repository", demo_dir)


@pytest.fixture
def make_server(lora_repo: Path, tmp_path: Path):
    """TritonServer(lora_repo, ...) with its log in tmp_path; skips where no tritonserver is installed."""
    def make(**kwargs) -> TritonServer:
        try:
            return TritonServer(lora_repo, log_path=tmp_path / "tritonserver.log", **kwargs)
        except FileNotFoundError as e:
            pytest.skip(str(e))
    return make


def tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, [1, 1], dtype)
    t.set_data_from_numpy(np.array([[value]], dtype=np.object_ if dtype == "BYTES" else None))
    return t


@dataclasses.dataclass
class Stream:
    """One gRPC stream with one long generation; records when responses and errors arrive."""

    client: grpcclient.InferenceServerClient
    responses: int = 0
    finish_reason: str | None = None
    completion_tokens: int | None = None
    final_at: float | None = None
    error: str | None = None
    error_at: float | None = None

    def on_result(self, result, error) -> None:
        if error is not None:
            if self.error is None:
                self.error, self.error_at = str(error), time.monotonic()
            return
        self.responses += 1
        reason = result.as_numpy("finish_reason")
        if reason is not None and reason.size and reason.flat[0]:  # the final response
            self.finish_reason, self.final_at = reason.flat[0].decode(), time.monotonic()
            self.completion_tokens = int(result.as_numpy("completion_tokens").flat[0])


@pytest.fixture
def open_streams():
    """open_streams(grpc_url, n, max_tokens): n gRPC streams, each with one long generation
    (closed at the end of the test)."""
    opened: list[Stream] = []

    def open_(url: str, n: int, max_tokens: int = 2000) -> list[Stream]:
        streams = [Stream(grpcclient.InferenceServerClient(url)) for _ in range(n)]
        opened.extend(streams)
        for stream in streams:
            stream.client.start_stream(callback=stream.on_result)
            stream.client.async_stream_infer("lora_llm", [
                tensor("text_input", b"Hello", "BYTES"), tensor("stream", True, "BOOL"),
                tensor("ignore_eos", True, "BOOL"), tensor("max_tokens", np.int64(max_tokens), "INT64")])
        return streams

    yield open_
    _close(opened)


@pytest.fixture
def wait_until():
    def wait(condition, timeout: float, what: str, step: float = 0.02) -> float:
        """Seconds until `condition()` held; fails the test after `timeout`."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not within {timeout:g} s: {what}")
            time.sleep(step)
        return time.monotonic() - started
    return wait


@pytest.fixture
def kill_stub():
    def kill(server: TritonServer) -> int:
        """kill -9 the server's (only) python backend stub; returns its pid."""
        stubs = [c.pid for c in processes.children(server.process.pid) if c.comm == processes.STUB_COMM]
        assert len(stubs) == 1, stubs
        os.kill(stubs[0], signal.SIGKILL)
        return stubs[0]
    return kill


def _close(streams: list[Stream]) -> None:
    def close(stream):
        try:
            stream.client.stop_stream(cancel_requests=True)
            stream.client.close()
        except Exception:  # the server may be gone: closing is best effort
            pass
    threads = [threading.Thread(target=close, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)


@pytest.fixture
def supervised_server(make_server):
    """A started server under the launcher's supervisor (watching in a thread); yields (server, supervisor)."""
    from multilora.launcher.supervisor import Supervisor

    server = make_server(exit_timeout_secs=2)
    supervisor = Supervisor(server)
    supervisor.start()
    watcher = threading.Thread(target=supervisor.run, daemon=True)
    watcher.start()
    try:
        yield server, supervisor
    finally:
        supervisor.stopping.set()
        watcher.join(timeout=60)
        supervisor.stop()
