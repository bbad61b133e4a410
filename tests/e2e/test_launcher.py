"""`multilora.launcher` with a real tritonserver serving a tiny decoupled echo model written into
tmp_path: the TritonServer class, then the command line. (Without a server: tests/launcher/.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from multilora import launcher
from multilora.launcher import shm

pytestmark = pytest.mark.e2e

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Echoes the text and the request's `adapter_id` parameter (the two things the real model reads),
# and numpy's version: the stub must import from the launcher's environment and from backend_src.
ECHO_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils
import multilora.launcher


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0]
            params = json.loads(request.parameters() or "{}")
            reply = f"{text.decode()}|{params.get('adapter_id')}|{np.__version__}".encode()
            out = pb_utils.Tensor("text_output", np.array([reply], dtype=np.object_))
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=[out]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None
'''

BROKEN_MODEL = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("echo model refuses to load")
'''


def write_model(repo: Path, source: str) -> Path:
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(textwrap.dedent(ECHO_CONFIG))
    (repo / "echo" / "1" / "model.py").write_text(textwrap.dedent(source))
    return repo


def _tritonserver_or_skip() -> None:
    try:
        launcher.find_tritonserver()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _server_or_skip(**kwargs) -> launcher.TritonServer:
    try:
        return launcher.TritonServer(**kwargs)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


def test_server_serves_generate(tmp_path, state_dir):
    repo = write_model(tmp_path / "repo", ECHO_MODEL)
    server = _server_or_skip(model_repository=repo, state_dir=state_dir,
                             log_path=tmp_path / "server.log", exit_timeout_secs=1)
    with server:
        assert server.is_ready()
        body = json.dumps({"text_input": "hello", "parameters": {"adapter_id": "sql"}}).encode()
        req = urllib.request.Request(server.url + "/v2/models/echo/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["text_output"] == f"hello|sql|{np.__version__}"
        ports = server.endpoints
        assert listening_addresses({ports.http_port, ports.grpc_port, ports.metrics_port}) == {"127.0.0.1"}
        assert list(shm.SHM_DIR.glob(server.shm_prefix + "*")), "the stub's region carries our prefix"
    assert server.process.returncode is not None
    assert not list(shm.SHM_DIR.glob(server.shm_prefix + "*"))


def listening_addresses(ports: set[int]) -> set[str]:
    """IPv4 addresses with a listening TCP socket on one of `ports`, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_failed_start_raises_with_log_tail(tmp_path, state_dir):
    repo = write_model(tmp_path / "repo", BROKEN_MODEL)
    server = _server_or_skip(model_repository=repo, state_dir=state_dir,
                             log_path=tmp_path / "server.log", exit_timeout_secs=1)
    with pytest.raises(launcher.ServerStartError, match="echo model refuses to load"):
        server.start()
    assert server.process.poll() is not None


def test_command_line_serves_on_loopback_and_stops_cleanly_on_sigterm(tmp_path):
    repo = write_model(tmp_path / "repo", ECHO_MODEL)
    _tritonserver_or_skip()
    http, grpc, metrics = launcher.free_ports(3)
    env = {**os.environ, "OPENAI_PORT": "0", "HTTP_ADDRESS": "127.0.0.1",
           "MULTILORA_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "multilora.launcher", "--model-repository", str(repo), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--exit-timeout-secs", "2",
         "--startup-timeout", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        output = "".join(lines)
        assert f"HTTP    http://127.0.0.1:{http}" in output, output[-3000:]
        prefix = next(a.split("=")[-1] for a in output.split() if "shm-region-prefix-name=" in a)
        assert list(shm.SHM_DIR.glob(prefix + "*"))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)  # reads the shutdown log, so the pipe never fills
        assert proc.returncode == 0
        assert time.monotonic() - started < 15
        assert not list(shm.SHM_DIR.glob(prefix + "*"))
    finally:
        proc.kill()
        proc.wait()
