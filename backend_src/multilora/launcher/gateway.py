"""The OpenAI/TGI gateway (`multilora_client.gateway`) as a child process next to tritonserver.

The gateway is a separate program that speaks gRPC to Triton; the launcher only starts it once
Triton is ready, restarts it when it dies and stops it on exit, before Triton: SIGTERM lets its
running answers finish within the same drain time as Triton's exit timeout (streams cut at that
deadline end with an error event), and Triton keeps serving them meanwhile. Its command line is the
contract:
    python -m multilora_client.gateway --triton-grpc HOST:PORT --host ADDRESS --port PORT --drain-timeout S
        [--triton-http URL]
With `--triton-http` (the launcher passes Triton's loopback HTTP URL) the gateway also takes KServe v2
HTTP requests under /v2 and passes them on after its own checks, so Triton's HTTP port need not be
exposed (docs/security.md).
"""
from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

GATEWAY_MODULE = "multilora_client.gateway"
RESTART_DELAY_S = 5.0  # a gateway that dies at once (port taken) is not restarted in a tight loop
# Dying this soon after its start this many times in a row (a missing dependency, a port taken)
# will not get better by restarting: the launcher gives up on the gateway and Triton serves on.
QUICK_EXIT_S = 10.0
QUICK_EXITS_TO_GIVE_UP = 3
DRAIN_TIMEOUT_S = 30.0  # tritonserver's own default exit timeout
# Past the drain time, before SIGKILL: the gateway's own deadline has cut the streams by then and
# only has their error events to write.
STOP_GRACE_S = 5.0


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class GatewayProcess:
    def __init__(self, port: int, host: str, triton_grpc: str, module: str = GATEWAY_MODULE, *,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, triton_http: str | None = None) -> None:
        self.host, self.port = host, port
        self.drain_timeout_s = drain_timeout_s
        self.command = [sys.executable, "-m", module, "--triton-grpc", triton_grpc,
                        "--host", host, "--port", str(port), "--drain-timeout", f"{drain_timeout_s:g}"]
        if triton_http is not None:
            self.command += ["--triton-http", triton_http]
        self.module = module
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._quick_exits = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> bool:
        """Start it; False (and one log line) when the gateway is not installed."""
        if not module_available(self.module):
            log.warning("%s is not installed (pip install -e './client[gateway]'); the OpenAI gateway "
                        "stays off", self.module)
            return False
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self._started_at = time.monotonic()
        log.info("gateway started (pid %d): %s", self.process.pid, " ".join(self.command))
        return True

    def ensure_running(self) -> None:
        """Restart a gateway that died, at most once every RESTART_DELAY_S."""
        if self.process is None or self.process.poll() is None:
            return
        if time.monotonic() - self._started_at < RESTART_DELAY_S:
            return
        lived = time.monotonic() - self._started_at  # seen within one supervisor check of its exit
        self._quick_exits = self._quick_exits + 1 if lived < QUICK_EXIT_S else 0
        if self._quick_exits >= QUICK_EXITS_TO_GIVE_UP:
            log.error("gateway exited with code %d within %.0f s of its start %d times in a row; "
                      "giving up on it (Triton keeps serving)", self.process.returncode, QUICK_EXIT_S,
                      self._quick_exits)
            self.process = None
            return
        log.error("gateway (pid %d) exited with code %d; restarting it", self.process.pid,
                  self.process.returncode)
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        """SIGTERM, then wait for the gateway to drain (its running answers end within its drain time)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.drain_timeout_s + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("gateway (pid %d) still up %.0f s after SIGTERM; killing it", proc.pid,
                        self.drain_timeout_s + STOP_GRACE_S)
            proc.kill()
            proc.wait()
