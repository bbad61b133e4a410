"""Start a real `tritonserver`: the one place that knows where it lives and what it needs.

Two installs are supported:
- a `tritonserver` on PATH (the NGC container `nvcr.io/nvidia/tritonserver:24.10-py3`), whose
  python backend already sits in the server's default `/opt/tritonserver/backends`;
- the server bundled in the `nvidia-pytriton==0.7.0` wheel (tritonserver 2.51.0, the same
  release), for machines without Docker. Its python backend needs a writable backend folder
  with the stub for the running interpreter (`prepare_backend_directory`), and LD_LIBRARY_PATH
  so the stub embeds *this* interpreter's libpython (`server_env`).
With both, the stub must import from the environment running the launcher and from our sources,
which takes a small virtualenv shell, since the stub ignores PYTHONPATH (`prepare_stub_python`).

Only the standard library is used, so the package stays importable without Triton.

    python -m multilora.server_launcher --model-repository model_repository
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# backend_src/: put on the stub's path so model.py can import multilora.
PACKAGE_SOURCE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_SOURCE_ROOT.parent

INSTALL_HINT = (
    "no Triton Inference Server found: neither `tritonserver` on PATH nor the `nvidia-pytriton` "
    "wheel. Install the bundled server into this environment with\n"
    "    pip install --no-deps nvidia-pytriton==0.7.0   (see requirements-server.txt)\n"
    "or run inside the container nvcr.io/nvidia/tritonserver:24.10-py3."
)


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    binary: Path
    # Set only for the wheel: its tree, which `prepare_backend_directory` copies from.
    bundled_root: Path | None = None  # site-packages/pytriton/tritonserver
    libs_dir: Path | None = None  # site-packages/nvidia_pytriton.libs

    @property
    def bundled(self) -> bool:
        return self.bundled_root is not None


def _bundled_root() -> Path | None:
    """`pytriton/tritonserver` of the installed wheel, found without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path))
    root = _bundled_root()
    if root is None:
        raise FileNotFoundError(INSTALL_HINT)
    return TritonInstall(
        binary=root / "bin" / "tritonserver",
        bundled_root=root,
        libs_dir=root.parent.parent / "nvidia_pytriton.libs",
    )


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _copy_if_changed(src: Path, dst: Path) -> None:
    """Copy keeping mtime, so a second call sees no change; replace atomically so a server
    that has the old file mapped keeps running."""
    if dst.is_file():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):
            return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def prepare_backend_directory(install: TritonInstall, state_dir: Path) -> Path:
    """Fill `<state_dir>/backends/python/` for the bundled server; return `<state_dir>/backends`.

    The wheel keeps the stubs for every Python apart from `libtriton_python.so`; the backend
    looks for `triton_python_backend_stub` next to itself, so the pair is copied together
    (copied, not linked: their RPATH is `$ORIGIN`-relative, and the environment from
    `server_env` supplies the libraries instead).
    """
    if not install.bundled:
        raise ValueError(f"{install.binary} is not the bundled server; it uses its own backends")
    tag = python_version_tag()
    stub = install.bundled_root / "python_backend_stubs" / tag / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (install.bundled_root / "python_backend_stubs").iterdir())
        raise FileNotFoundError(
            f"the bundled tritonserver has no python backend stub for Python {tag} "
            f"(it has {', '.join(have)}); run the server with one of those interpreters"
        )
    backends = Path(state_dir) / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted((install.bundled_root / "backends" / "python").iterdir()):
        if src.is_file():  # libtriton_python.so, triton_python_backend_utils.py
            _copy_if_changed(src, target / src.name)
    _copy_if_changed(stub, target / stub.name)
    return backends


def _shared_libpython_dir() -> str:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (Path(libdir) / soname).exists():
        log.warning(
            "%s has no shared libpython in %s; the python backend stub will load the system's "
            "libpython%s, which must be the same build as this interpreter",
            sys.executable, libdir, python_version_tag(),
        )
    return libdir


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _symlink_if_changed(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def prepare_stub_python(
    state_dir: Path, extra_pythonpath: Sequence[str | os.PathLike] = ()
) -> Path:
    """A virtualenv shell under `<state_dir>/python/` for the stub's embedded Python; returns its
    `bin/`, which `server_env` puts first on PATH.

    The stub initialises Python with `PyConfig_InitIsolatedConfig`, so PYTHONPATH and
    VIRTUAL_ENV are ignored and it would import the base interpreter's site-packages (with
    another numpy, which crashes the stub on the first BYTES tensor). What it still does is
    look up `python3` on PATH and honour a `pyvenv.cfg` next to it, like any venv. So this
    shell's `python3` points at the running interpreter and its site-packages holds one `.pth`
    that adds `extra_pythonpath` (our sources, first), this process's PYTHONPATH, and then this
    interpreter's site directories via `site.addsitedir`, so their `.pth` files (editable
    installs) count too. The running interpreter must be the stub's Python: in the container,
    the system `python3`.
    """
    root = Path(state_dir).resolve() / "python"
    bin_dir = root / "bin"
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": root, "platbase": root}))
    bin_dir.mkdir(parents=True, exist_ok=True)
    site_packages.mkdir(parents=True, exist_ok=True)
    base_executable = Path(getattr(sys, "_base_executable", None) or sys.executable)
    _write_if_changed(root / "pyvenv.cfg", (
        f"home = {base_executable.parent}\n"
        "include-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n"
    ))
    for name in ("python", "python3", f"python{python_version_tag()}"):
        _symlink_if_changed(bin_dir / name, base_executable)
    user_site = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    site_dirs = dict.fromkeys(user_site + site.getsitepackages())
    from_env = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    dirs = [*extra_pythonpath, *filter(None, from_env)]
    lines = list(dict.fromkeys(str(Path(p).resolve()) for p in dirs))
    lines += [f"import site; site.addsitedir({d!r})" for d in site_dirs if Path(d).is_dir()]
    _write_if_changed(site_packages / "multilora_launcher.pth", "\n".join(lines) + "\n")
    return bin_dir


def _join_paths(*parts: str | os.PathLike | None) -> str:
    seen: list[str] = []
    for part in parts:
        for p in str(part or "").split(os.pathsep):
            if p and p not in seen:
                seen.append(p)
    return os.pathsep.join(seen)


def server_env(
    install: TritonInstall, stub_python_bin: Path, base: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for `tritonserver`; its python backend stubs inherit it.

    - PATH: `stub_python_bin` (from `prepare_stub_python`) first: it picks the stub's packages.
    - HF_HUB_DISABLE_TELEMETRY=1 unless set: huggingface_hub otherwise calls home from the server.
    - bundled only, LD_LIBRARY_PATH: this interpreter's LIBDIR first, so the stub embeds the
      libpython that matches the stdlib it will import (the distro's libpython3.11 is another
      patch release, and `import ssl` then fails with an undefined symbol); then
      `nvidia_pytriton.libs` for the copied backend and stub, whose RPATH no longer applies.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _join_paths(stub_python_bin, env.get("PATH") or os.defpath)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # a server fetches weights, it does not report home
    if install.bundled:
        env["LD_LIBRARY_PATH"] = _join_paths(
            _shared_libpython_dir(), install.libs_dir, env.get("LD_LIBRARY_PATH")
        )
    return env


def build_command(
    model_repository: str | os.PathLike,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    extra_args: Sequence[str] = (),
    *,
    binary: str | os.PathLike = "tritonserver",
    backend_directory: str | os.PathLike | None = None,
    exit_timeout_secs: int | None = None,
) -> list[str]:
    cmd = [
        str(binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
    ]
    if backend_directory is not None:
        cmd.append(f"--backend-directory={Path(backend_directory).resolve()}")
    if exit_timeout_secs is not None:
        cmd.append(f"--exit-timeout-secs={exit_timeout_secs}")
    return cmd + list(extra_args)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free right now (another process may take one before the server)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:  # held open together so the ports differ
            s.bind(("127.0.0.1", 0))
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

    Ports default to free ones. `log_path=None` leaves the output on this process's console.
    `exit_timeout_secs` is how long the server waits for open requests at shutdown (30 s by
    default in Triton; keep it small in tests).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
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
        self.http_port = http_port or next(free)
        self.grpc_port = grpc_port or next(free)
        self.metrics_port = metrics_port or next(free)
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.exit_timeout_secs = exit_timeout_secs
        backend_directory = None
        if self.install.bundled:
            backend_directory = prepare_backend_directory(self.install, self.state_dir)
        self.command = build_command(
            model_repository, self.http_port, self.grpc_port, self.metrics_port, extra_args,
            binary=self.install.binary, backend_directory=backend_directory,
            exit_timeout_secs=exit_timeout_secs,
        )
        self.env = server_env(self.install, prepare_stub_python(self.state_dir, extra_pythonpath))
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> "TritonServer":
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "wb")
        else:
            out = None
        started = time.monotonic()
        try:
            # Own session: a Ctrl-C meant for us does not reach the server; `stop` ends it.
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
        try:
            with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

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
            f"tritonserver not ready at {self.url}/v2/health/ready "
            f"after {self.startup_timeout:.0f} s"
            f"\ncommand: {' '.join(self.command)}\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 50) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(the server's output went to the console above)"
        with open(self.log_path, errors="replace") as f:
            return f"--- last lines of {self.log_path} ---\n" + "".join(deque(f, maxlen=n))

    def stop(self) -> int | None:
        """SIGINT (graceful, bounded by --exit-timeout-secs), then SIGKILL to the process group."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        grace = (self.exit_timeout_secs if self.exit_timeout_secs is not None else 30) + 10
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver (pid %d) still up %d s after SIGINT; killing it",
                        proc.pid, grace)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its session: the server and its stubs
            except ProcessLookupError:
                pass
            return proc.wait()

    def wait(self) -> int:
        return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def default_state_dir() -> Path:
    """$MULTILORA_STATE_DIR, else `<repo>/.run` in a checkout, else a per-user cache folder."""
    if os.environ.get("MULTILORA_STATE_DIR"):
        return Path(os.environ["MULTILORA_STATE_DIR"])
    if (REPO_ROOT / "backend_src").is_dir():
        return REPO_ROOT / ".run"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multilora"


def _banner(server: TritonServer) -> str:
    return (
        f"tritonserver ready ({server.install.binary}), started in {server.startup_seconds:.1f} s\n"
        f"  HTTP    {server.url}\n"
        f"  gRPC    {server.grpc_url}\n"
        f"  metrics {server.metrics_url}\n"
        "try:\n"
        f"  curl -s -X POST {server.url}/v2/models/lora_llm/generate \\\n"
        "    -d '{\"text_input\": \"List the names of all customers in Berlin.\", "
        "\"parameters\": {\"adapter_id\": \"sql\", \"max_tokens\": 64}}'\n"
        "Ctrl-C stops the server."
    )


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m multilora.server_launcher",
        description="Run tritonserver in the foreground: the one on PATH, "
                    "else the one from the nvidia-pytriton wheel.",
        epilog="Arguments after `--` go to tritonserver unchanged, e.g. -- --log-verbose=1",
    )
    p.add_argument("--model-repository",
                   default=os.environ.get("MODEL_REPOSITORY", "model_repository"))
    p.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the backend folder and the stub's Python are prepared "
                        "(default: $MULTILORA_STATE_DIR or <repo>/.run)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--exit-timeout-secs", type=int, default=None)
    p.add_argument("tritonserver_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    extra = args.tritonserver_args
    if extra[:1] == ["--"]:
        extra = extra[1:]

    if not Path(args.model_repository).is_dir():
        p.error(f"--model-repository {args.model_repository!r} is not a directory")
    try:
        server = TritonServer(
            args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, state_dir=args.state_dir, extra_args=extra,
            startup_timeout=args.startup_timeout, exit_timeout_secs=args.exit_timeout_secs,
        )
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    # `docker stop` sends SIGTERM: turn it into the same clean shutdown as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(" ".join(server.command), flush=True)
    try:
        with server:
            print(_banner(server), flush=True)
            return server.wait()
    except ServerStartError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
