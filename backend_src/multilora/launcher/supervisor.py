"""Keep tritonserver serving: restart it when it, or one of its python backend stubs, dies.

Why a restart of the whole server, not a reload of the model through Triton's model control API:
measured on tritonserver 2.51 (docs/reliability.md), a model whose stub was killed can be unloaded
and loaded again, but its in-flight requests are never answered (their responses could only come
from the dead stub), the old instance never finishes unloading, and the zombie stub stays. Ending
the server closes every connection, so each in-flight client gets an error at once, and a fresh
server serves again after one model load. The stub of a decoupled model is not restarted by the
python backend itself (in 2.51 nor in 26.05).

What counts as dead, checked every `interval` seconds:
- the tritonserver process exited;
- a python backend stub of it is a zombie (2.51 never reaps a dead stub, see `processes`). With
  the default model control mode ("none") no model is ever unloaded on purpose, so one sighting
  is enough; with "explicit" or "poll" an unload kills its stub and reaps it right away, so a
  zombie must be seen in two checks in a row;
- in mode "none" only: `/v2/health/ready` answered "not ready" `ready_failures` times in a row
  (26.04+ reports a dead stub there). No answer at all (a busy server) does not count.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from multilora.launcher import probes, processes
from multilora.launcher.gateway import GatewayProcess
from multilora.launcher.server import TritonServer

log = logging.getLogger(__name__)


class GaveUp(RuntimeError):
    """The server died too often; the launcher exits and leaves it to whatever runs the launcher."""


def model_control_mode(args: Sequence[str]) -> str:
    mode = "none"
    for i, arg in enumerate(args):
        if arg.startswith("--model-control-mode="):
            mode = arg.split("=", 1)[1]
        elif arg == "--model-control-mode" and i + 1 < len(args):
            mode = args[i + 1]
    return mode


class Supervisor:
    def __init__(
        self,
        server: TritonServer,
        gateway: GatewayProcess | None = None,
        *,
        interval: float = 0.5,
        ready_failures: int = 3,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
    ) -> None:
        self.server = server
        self.gateway = gateway
        self.interval = interval
        self.ready_failures = ready_failures
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.fixed_models = model_control_mode(server.command) == "none"
        self.restarts: deque[float] = deque()
        self.stopping = threading.Event()
        self._not_ready = 0
        self._dead_before: set[int] = set()

    def start(self) -> None:
        self.server.start()
        if self.gateway is not None and not self.gateway.start():
            self.gateway = None

    def run(self) -> None:
        """Watch until `stopping` is set, interrupted (KeyboardInterrupt) or given up (GaveUp)."""
        while not self.stopping.wait(self.interval):
            self.check_once()

    def check_once(self) -> str | None:
        """One round of watching; returns why the server was restarted, if it was."""
        own = {p for p in (self.server.process.pid, self.gateway and self.gateway.pid) if p}
        processes.reap_adopted_zombies(own)
        reason = self.failure()
        if reason is not None:
            self.restart(reason)
        if self.gateway is not None:
            self.gateway.ensure_running()
        return reason

    def failure(self) -> str | None:
        code = self.server.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        dead = set(self.server.dead_stubs())
        confirmed, self._dead_before = (dead if self.fixed_models else dead & self._dead_before), dead
        if confirmed:
            return f"python backend stub(s) {', '.join(map(str, sorted(confirmed)))} died"
        if self.fixed_models:
            status = probes.http_status(self.server.url + "/v2/health/ready", timeout=2.0)
            self._not_ready = self._not_ready + 1 if status not in (200, None) else 0
            if self._not_ready >= self.ready_failures:
                return f"/v2/health/ready answered {status} {self._not_ready} times in a row"
        return None

    def restart(self, reason: str) -> None:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            raise GaveUp(f"{reason}; tritonserver was restarted {len(self.restarts)} times in the last "
                         f"{self.restart_window_s:.0f} s already, giving up")
        self.restarts.append(now)
        log.error("%s: restarting tritonserver (in-flight requests end with an error)", reason)
        self.server.kill()
        self._not_ready, self._dead_before = 0, set()
        self.server.start()  # ServerStartError ends the launcher: a server that cannot start stays down
        log.warning("tritonserver serves again, %.1f s after the failure was seen", time.monotonic() - now)

    def stop(self) -> int | None:
        """Stop the gateway and the server (after `run` returned, or from its thread)."""
        self.stopping.set()
        if self.gateway is not None:
            self.gateway.stop()
        return self.server.stop()
