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

How often (`RestartPolicy`): a server that dies is restarted at once the first time, then after a
delay that doubles with each further failure in a row (1, 2, 4 ... s, capped); a server that has
served for `healthy_after_s` starts the count afresh. The supervisor never gives up on a server
that starts and becomes ready, however often it is killed (a client that can crash it must not turn
that into a permanent outage); it gives up only when `max_failed_starts` starts in a row never
became ready: a server that cannot start at all is not helped by starting it again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from multilora.launcher import probes, processes
from multilora.launcher.gateway import GatewayProcess
from multilora.launcher.server import ServerStartError, TritonServer

log = logging.getLogger(__name__)


class GaveUp(RuntimeError):
    """The server cannot start any more; the launcher exits and leaves it to whatever runs it."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a server that died, and when to stop trying (see the module docstring)."""

    first_delay_s: float = 1.0  # before the second restart in a row; the first one is immediate
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0  # serving this long after a restart ends the run of failures
    max_failed_starts: int = 5  # starts in a row that never became ready before giving up

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting after the `failures`-th failure in a row (1: the first)."""
        if failures <= 1:
            return 0.0
        return min(self.first_delay_s * 2 ** (failures - 2), self.max_delay_s)


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
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        self.server = server
        self.gateway = gateway
        self.interval = interval
        self.ready_failures = ready_failures
        self.policy = policy
        self.fixed_models = model_control_mode(server.command) == "none"
        self.restarts = 0  # restart attempts since the launcher started
        self.failures_in_a_row = 0  # failures since the server last served for policy.healthy_after_s
        self.serving_since = 0.0  # when the server last became ready
        self.stopping = threading.Event()
        self._not_ready = 0
        self._dead_before: set[int] = set()

    def start(self) -> None:
        self.server.start()
        self.serving_since = time.monotonic()
        if self.gateway is not None and not self.gateway.start():
            self.gateway = None

    def run(self) -> None:
        """Watch until `stopping` is set, interrupted (KeyboardInterrupt) or given up (GaveUp: the
        server no longer starts)."""
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
        """Kill the server and start it again, after the policy's delay; GaveUp when it cannot start."""
        seen = time.monotonic()
        if seen - self.serving_since >= self.policy.healthy_after_s:
            self.failures_in_a_row = 0
        log.error("%s: restarting tritonserver (in-flight requests end with an error)", reason)
        self.server.kill()
        self._not_ready, self._dead_before = 0, set()
        failed_starts = 0
        while True:
            self.failures_in_a_row += 1
            delay = self.policy.delay(self.failures_in_a_row)
            if delay:
                log.warning("failure %d in a row: waiting %.0f s before the restart", self.failures_in_a_row, delay)
                if self.stopping.wait(delay):
                    return  # stopped meanwhile: `stop` cleans up
            self.restarts += 1
            try:
                self.server.start()
                break
            except ServerStartError as error:
                failed_starts += 1
                if failed_starts >= self.policy.max_failed_starts:
                    raise GaveUp(f"tritonserver did not start {failed_starts} times in a row; giving up\n"
                                 f"{error}") from None
                log.error("tritonserver did not start (try %d of %d): %s", failed_starts,
                          self.policy.max_failed_starts, error)
        self.serving_since = time.monotonic()
        log.warning("tritonserver serves again, %.1f s after the failure was seen", self.serving_since - seen)

    def stop(self) -> int | None:
        """Stop the gateway and the server (after `run` returned, or from its thread)."""
        self.stopping.set()
        if self.gateway is not None:
            self.gateway.stop()
        return self.server.stop()
