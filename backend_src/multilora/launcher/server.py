"""`tritonserver` as a child process: its command line, start, graceful stop, kill and cleanup."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from multilora.launcher import probes, processes, shm
from multilora.launcher.install import (
    PACKAGE_SOURCE_ROOT,
    TritonInstall,
    default_state_dir,
    find_tritonserver,
    prepare_backend_directory,
    prepare_stub_python,
    server_env,
)

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TRITON_EXIT_TIMEOUT_S = 30  # tritonserver's own default for --exit-timeout-secs
EXIT_GRACE_S = 5.0  # past the exit timeout, before SIGKILL
# Nothing in flight for this long after SIGINT and still running: see `TritonServer.stop`.
IDLE_EXIT_S = 3.0


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where the server listens. Addresses default to loopback: see docs/security.md."""

    http_port: int
    grpc_port: int
    metrics_port: int
    http_address: str = LOOPBACK
    grpc_address: str = LOOPBACK

    def args(self) -> list[str]:
        # The metrics port follows --http-address unless told otherwise (--metrics-address).
        return [f"--http-address={self.http_address}", f"--http-port={self.http_port}",
                f"--grpc-address={self.grpc_address}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}"]

    @property
    def url(self) -> str:
        return f"http://{client_host(self.http_address)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.grpc_address)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{client_host(self.http_address)}:{self.metrics_port}/metrics"


def client_host(address: str) -> str:
    """Where a client on this machine reaches a server bound to `address`."""
    if address in ("", "0.0.0.0"):
        return LOOPBACK
    if ":" in address:  # IPv6
        return "[::1]" if address == "::" else f"[{address}]"
    return address


def build_command(
    model_repository: str | os.PathLike,
    endpoints: Endpoints,
    extra_args: Sequence[str] = (),
    *,
    binary: str | os.PathLike = "tritonserver",
    backend_directory: str | os.PathLike | None = None,
    exit_timeout_secs: int | None = None,
    shm_prefix: str | None = None,
) -> list[str]:
    cmd = [str(binary), f"--model-repository={Path(model_repository).resolve()}", *endpoints.args()]
    if backend_directory is not None:
        cmd.append(f"--backend-directory={Path(backend_directory).resolve()}")
    if exit_timeout_secs is not None:
        cmd.append(f"--exit-timeout-secs={exit_timeout_secs}")
    if shm_prefix is not None:
        cmd.append(shm.backend_config_arg(shm_prefix))
    return cmd + list(extra_args)  # last: a flag given twice takes its last value


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free right now (another process may take one before the server)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:  # held open together so the ports differ
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class TritonServer:
    """A `tritonserver` child process, started on `__enter__` and stopped on `__exit__`.

        with TritonServer("model_repository", log_path=tmp / "server.log") as server:
            urllib.request.urlopen(server.url + "/v2/health/ready")

    Ports default to free ones, addresses to loopback. `log_path=None` leaves the output on this
    process's console (a restart appends to the same file). `exit_timeout_secs` bounds how long
    the server drains open requests at shutdown (Triton's default, 30 s, when None).
    `start` may be called again after `stop` or `kill`: the supervisor restarts it that way.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        http_address: str = LOOPBACK,
        grpc_address: str | None = None,
        state_dir: str | os.PathLike | None = None,
        extra_pythonpath: Sequence[str | os.PathLike] = (PACKAGE_SOURCE_ROOT,),
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 120.0,
        exit_timeout_secs: int | None = 5,
        install: TritonInstall | None = None,
    ) -> None:
        self.install = install or find_tritonserver()
        free = iter(free_ports(3))
        self.endpoints = Endpoints(http_port or next(free), grpc_port or next(free), metrics_port or next(free),
                                   http_address, grpc_address or http_address)
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.exit_timeout_secs = exit_timeout_secs
        self.shm_prefix = shm.new_prefix()
        backend_directory = None
        if self.install.bundled:
            backend_directory = prepare_backend_directory(self.install, self.state_dir)
        self.command = build_command(
            model_repository, self.endpoints, extra_args, binary=self.install.binary,
            backend_directory=backend_directory, exit_timeout_secs=exit_timeout_secs, shm_prefix=self.shm_prefix,
        )
        self.env = server_env(self.install, prepare_stub_python(self.state_dir, extra_pythonpath))
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return self.endpoints.url

    @property
    def grpc_url(self) -> str:
        return self.endpoints.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.endpoints.metrics_url

    def start(self) -> TritonServer:
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")
        started = time.monotonic()
        try:
            # Own session: a Ctrl-C meant for us does not reach the server; `stop` ends it, and
            # a kill of the session ends the server with its stubs.
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def is_ready(self) -> bool:
        return probes.server_ready(self.url)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    f"\ncommand: {' '.join(self.command)}\n{self._log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerStartError(
            f"tritonserver not ready at {self.url}/v2/health/ready after {self.startup_timeout:.0f} s"
            f"\ncommand: {' '.join(self.command)}\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 50) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(the server's output went to the console above)"
        with open(self.log_path, errors="replace") as f:
            return f"--- last lines of {self.log_path} ---\n" + "".join(deque(f, maxlen=n))

    def dead_stubs(self) -> list[int]:
        """Python backend stubs of the running server that died (see `processes`)."""
        if self.process is None or self.process.poll() is not None:
            return []
        return processes.dead_stubs(self.process.pid)

    def stop(self) -> int | None:
        """Graceful: SIGINT, which lets in-flight requests finish within the exit timeout.

        Then SIGKILL to the whole session when the server is still up after the exit timeout,
        or when nothing has been in flight for IDLE_EXIT_S: tritonserver 2.51 can wait out its
        whole exit timeout for a model it never unloads (a gRPC stream whose request it rejected,
        cancelled by the client, keeps a reference to the model; docs/reliability.md).
        """
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            self._wait_for_exit(proc)
        return self._reap(proc)

    def kill(self) -> int | None:
        """SIGKILL the server and its stubs now: for a server that cannot serve any more."""
        proc = self.process
        return None if proc is None else self._reap(proc)

    def _wait_for_exit(self, proc: subprocess.Popen) -> None:
        timeout = self.exit_timeout_secs if self.exit_timeout_secs is not None else TRITON_EXIT_TIMEOUT_S
        deadline = time.monotonic() + timeout + EXIT_GRACE_S
        idle_since = None
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                log.warning("tritonserver (pid %d) still up %.0f s after SIGINT; killing it",
                            proc.pid, timeout + EXIT_GRACE_S)
                return
            if probes.is_idle(self.metrics_url):
                idle_since = idle_since or now
                if now - idle_since >= IDLE_EXIT_S:
                    log.warning("tritonserver (pid %d) has had nothing in flight for %.0f s but is still "
                                "shutting down; killing it", proc.pid, IDLE_EXIT_S)
                    return
            else:
                idle_since = None
            time.sleep(0.25)

    def _reap(self, proc: subprocess.Popen) -> int:
        """SIGKILL what is left of the server's session, wait, remove its shared memory."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its stubs (a session of their own)
        except ProcessLookupError:
            pass
        code = proc.wait()
        shm.remove_regions(self.shm_prefix)
        return code

    def wait(self) -> int:
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
