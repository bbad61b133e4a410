"""`multilora.launcher.supervisor` and `gateway` with stand-ins for tritonserver and the gateway."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from multilora.launcher import gateway as gw
from multilora.launcher.server import ServerStartError
from multilora.launcher.supervisor import GaveUp, RestartPolicy, Supervisor, model_control_mode


class FakeServer:
    """What the supervisor uses of TritonServer; its "tritonserver" is a sleeping child."""

    def __init__(self, url="http://127.0.0.1:9", command=("tritonserver",)):
        self.url, self.command = url, list(command)
        self.stubs: list[int] = []
        self.calls: list[str] = []
        self.process = None
        self.failing_starts = 0  # the next this many starts raise ServerStartError
        self.start()

    def start(self):
        self.calls.append("start")
        if self.failing_starts:
            self.failing_starts -= 1
            raise ServerStartError("tritonserver exited with code 1 before it was ready")
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def kill(self):
        self.calls.append("kill")
        self.process.kill()
        return self.process.wait()

    stop = kill

    def dead_stubs(self):
        return self.stubs


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.kill()


def test_restarts_a_server_that_exited(server):
    supervisor = Supervisor(server)
    assert supervisor.check_once() is None and server.calls == ["start"]
    server.process.kill()
    server.process.wait()
    assert supervisor.check_once() == "tritonserver exited with code -9"
    assert server.calls == ["start", "kill", "start"] and server.process.poll() is None


def test_restarts_a_server_whose_stub_died(server):
    supervisor = Supervisor(server)
    server.stubs = [4242]
    assert supervisor.check_once() == "python backend stub(s) 4242 died"
    assert server.calls == ["start", "kill", "start"]


def test_with_model_control_a_zombie_stub_must_be_seen_twice():
    """An explicit unload kills its stub and reaps it at once: one sighting may be that moment."""
    server = FakeServer(command=["tritonserver", "--model-control-mode=explicit"])
    try:
        supervisor = Supervisor(server)
        server.stubs = [7]
        assert supervisor.check_once() is None
        server.stubs = [8]
        assert supervisor.check_once() is None, "another stub, another unload"
        assert supervisor.check_once() == "python backend stub(s) 8 died"
    finally:
        server.kill()


QUICK = RestartPolicy(first_delay_s=0.01, max_delay_s=0.04, healthy_after_s=60.0, max_failed_starts=3)


def test_the_delay_before_a_restart_doubles_up_to_its_cap():
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_server_that_keeps_dying_but_starts_is_never_given_up(server, monkeypatch):
    """Issue 23 item 2: six crashes used to end the launcher (5 restarts in 10 minutes at most)."""
    supervisor = Supervisor(server, policy=QUICK)
    waited = []
    wait = supervisor.stopping.wait
    monkeypatch.setattr(supervisor.stopping, "wait", lambda s: waited.append(s) or wait(s))
    server.stubs = [1]
    for _ in range(12):
        assert supervisor.check_once() == "python backend stub(s) 1 died"
    assert supervisor.restarts == 12 and server.calls.count("start") == 13
    assert waited == [QUICK.delay(n) for n in range(2, 13)] and waited[-1] == QUICK.max_delay_s


def test_serving_for_a_while_starts_the_count_afresh(server):
    supervisor = Supervisor(server, policy=QUICK)
    server.stubs = [1]
    supervisor.check_once()
    supervisor.check_once()
    assert supervisor.failures_in_a_row == 2
    supervisor.serving_since -= QUICK.healthy_after_s  # as if it had served for a minute since
    supervisor.check_once()
    assert supervisor.failures_in_a_row == 1


def test_gives_up_only_when_the_server_no_longer_starts(server):
    supervisor = Supervisor(server, policy=QUICK)
    server.stubs = [1]
    server.failing_starts = 2  # two failed starts, then it starts again: not given up
    supervisor.check_once()
    assert server.calls == ["start", "kill", "start", "start", "start"] and server.process.poll() is None
    server.failing_starts = 3
    with pytest.raises(GaveUp, match="did not start 3 times in a row; giving up"):
        supervisor.check_once()


class Readiness(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def readiness():
    http = ThreadingHTTPServer(("127.0.0.1", 0), Readiness)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()
    Readiness.status = 200


def test_not_ready_answers_in_a_row_restart_in_mode_none_only(readiness):
    Readiness.status = 400
    watched, explicit = FakeServer(readiness), FakeServer(readiness, ["tritonserver", "--model-control-mode=explicit"])
    try:
        supervisor, unwatched = Supervisor(watched, ready_failures=3), Supervisor(explicit, ready_failures=3)
        assert [supervisor.check_once() for _ in range(3)][:2] == [None, None]
        assert watched.calls == ["start", "kill", "start"]
        assert [unwatched.check_once() for _ in range(3)] == [None, None, None]
        Readiness.status = 200
        assert supervisor.check_once() is None
    finally:
        watched.kill()
        explicit.kill()


def test_a_silent_server_is_busy_not_dead(server):
    supervisor = Supervisor(server, ready_failures=1)  # http://127.0.0.1:9 answers nothing
    assert [supervisor.check_once() for _ in range(3)] == [None, None, None]


def test_model_control_mode_from_either_spelling():
    assert model_control_mode(["tritonserver"]) == "none"
    assert model_control_mode(["--model-control-mode=explicit"]) == "explicit"
    assert model_control_mode(["--model-control-mode", "poll"]) == "poll"


# -- the gateway child ---------------------------------------------------------------------------
FAKE_GATEWAY = """
    import json, sys, time
    with open(sys.argv[0] + ".runs", "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    time.sleep(60)
"""


@pytest.fixture
def fake_gateway(tmp_path, monkeypatch):
    (tmp_path / "fake_gateway.py").write_text(textwrap.dedent(FAKE_GATEWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gw, "RESTART_DELAY_S", 0.0)
    return tmp_path / "fake_gateway.py.runs"


def wait_for_lines(path, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return path.read_text().splitlines()
        time.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {n} lines")


def test_gateway_gets_the_contract_arguments_is_restarted_and_stopped(server, fake_gateway):
    gateway = gw.GatewayProcess(9000, "127.0.0.1", "127.0.0.1:8001", module="fake_gateway")
    supervisor = Supervisor(server, gateway)
    supervisor.gateway.start()
    runs = wait_for_lines(fake_gateway, 1)
    assert runs == ['["--triton-grpc", "127.0.0.1:8001", "--host", "127.0.0.1", "--port", "9000", "--drain-timeout", '
                    '"30"]']
    first = gateway.process
    first.kill()
    first.wait()
    supervisor.check_once()
    wait_for_lines(fake_gateway, 2)
    assert gateway.restarts == 1 and gateway.process.poll() is None and gateway.process is not first
    supervisor.stop()
    assert gateway.process.poll() is not None and server.process.poll() is not None


def test_the_launcher_gives_the_gateway_tritons_http_url_and_its_own_address(monkeypatch):
    """KServe v2 HTTP clients reach Triton through the gateway's checks; Triton's HTTP can stay on loopback."""
    from multilora.launcher.__main__ import parse_args

    monkeypatch.delenv("HTTP_ADDRESS", raising=False)
    monkeypatch.setenv("GATEWAY_ADDRESS", "0.0.0.0")
    args = parse_args(["--model-repository", ".", "--gateway-port", "9000"])
    assert (args.http_address, args.gateway_address) == ("127.0.0.1", "0.0.0.0")
    gateway = gw.GatewayProcess(9000, "0.0.0.0", "127.0.0.1:8001", triton_http="http://127.0.0.1:8000",
                                drain_timeout_s=12)
    assert gateway.command[3:] == ["--triton-grpc", "127.0.0.1:8001", "--host", "0.0.0.0", "--port", "9000",
                                   "--drain-timeout", "12", "--triton-http", "http://127.0.0.1:8000"]


DRAINING_GATEWAY = """
    import signal, sys, time
    def drain(signum, frame):
        time.sleep(6)  # longer than the 5 s the launcher used to allow
        with open(sys.argv[0] + ".runs", "a") as f:
            f.write(f"drained {time.time()}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, drain)
    with open(sys.argv[0] + ".runs", "a") as f:
        f.write("started\\n")
    time.sleep(60)
"""


def test_the_gateway_drains_before_triton_is_stopped(server, tmp_path, monkeypatch):
    """Issue 23 item 5: the gateway used to be killed 5 s after SIGTERM, cutting its streams."""
    (tmp_path / "draining_gateway.py").write_text(textwrap.dedent(DRAINING_GATEWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    gateway = gw.GatewayProcess(9000, "127.0.0.1", "127.0.0.1:8001", module="draining_gateway", drain_timeout_s=10)
    supervisor = Supervisor(server, gateway)
    gateway.start()
    runs = tmp_path / "draining_gateway.py.runs"
    wait_for_lines(runs, 1)
    stopped = []
    monkeypatch.setattr(server, "stop", lambda: stopped.append(time.time()) or server.kill())
    supervisor.stop()
    assert gateway.process.returncode == 0, "the gateway drained and exited by itself"
    drained_at = float(runs.read_text().splitlines()[-1].split()[1])
    assert stopped and stopped[0] >= drained_at, "Triton serves until the gateway has drained"


def test_a_gateway_that_dies_at_start_is_given_up_after_three_tries(tmp_path, monkeypatch, caplog):
    (tmp_path / "broken_gateway.py").write_text("raise SystemExit('no fastapi here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gw, "RESTART_DELAY_S", 0.0)
    gateway = gw.GatewayProcess(9000, "127.0.0.1", "127.0.0.1:8001", module="broken_gateway")
    gateway.start()
    with caplog.at_level(logging.ERROR):
        deadline = time.monotonic() + 60
        while gateway.process is not None and time.monotonic() < deadline:
            gateway.ensure_running()
            time.sleep(0.05)
    assert gateway.process is None and gateway.restarts == 2
    assert "within 10 s of its start 3 times in a row; giving up on it (Triton keeps serving)" in caplog.text


def test_missing_gateway_is_one_log_line_and_no_child(caplog):
    gateway = gw.GatewayProcess(9000, "127.0.0.1", "127.0.0.1:8001", module="no_such_pkg.gateway")
    with caplog.at_level(logging.WARNING):
        assert gateway.start() is False
    assert gateway.process is None
    assert "no_such_pkg.gateway is not installed" in caplog.text and "gateway stays off" in caplog.text
