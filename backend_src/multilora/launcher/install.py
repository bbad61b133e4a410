"""Where `tritonserver` lives and what it needs before it can start.

Two installs are supported:
- a `tritonserver` on PATH (the NGC container, see docker/Dockerfile), whose python backend
  already sits in the server's default `/opt/tritonserver/backends`;
- the server bundled in the `nvidia-pytriton==0.7.0` wheel (tritonserver 2.51.0, the NGC 24.10
  release), for machines without Docker. Its python backend needs a writable backend folder
  with the stub for the running interpreter (`prepare_backend_directory`), and LD_LIBRARY_PATH
  so the stub embeds *this* interpreter's libpython (`server_env`).
With both, the stub must import from the environment running the launcher and from our sources,
which takes a small virtualenv shell, since the stub ignores PYTHONPATH (`prepare_stub_python`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import site
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# backend_src/: put on the stub's path so model.py can import multilora.
PACKAGE_SOURCE_ROOT = Path(__file__).resolve().parents[2]
REPO_ROOT = PACKAGE_SOURCE_ROOT.parent

INSTALL_HINT = (
    "no Triton Inference Server found: neither `tritonserver` on PATH nor the `nvidia-pytriton` "
    "wheel. Install the bundled server into this environment with\n"
    "    pip install --no-deps nvidia-pytriton==0.7.0   (see requirements-server.txt)\n"
    "or run inside the image built from docker/Dockerfile."
)


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


def default_state_dir() -> Path:
    """$MULTILORA_STATE_DIR, else `<repo>/.run` in a checkout, else a per-user cache folder."""
    if os.environ.get("MULTILORA_STATE_DIR"):
        return Path(os.environ["MULTILORA_STATE_DIR"])
    if (REPO_ROOT / "backend_src").is_dir():
        return REPO_ROOT / ".run"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multilora"
