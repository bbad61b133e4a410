"""`multilora.launcher.install`: finding tritonserver, the backend folder, the stub's Python, the env."""
from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from multilora.launcher import install


def fake_bundle(root: Path) -> install.TritonInstall:
    """The wheel's layout with empty files: enough for the backend-folder logic."""
    server = root / "pytriton" / "tritonserver"
    for rel in ["bin/tritonserver", "backends/python/libtriton_python.so",
                "backends/python/triton_python_backend_utils.py",
                f"python_backend_stubs/{install.python_version_tag()}/triton_python_backend_stub",
                "python_backend_stubs/3.8/triton_python_backend_stub"]:
        (server / rel).parent.mkdir(parents=True, exist_ok=True)
        (server / rel).write_text(rel)
    (root / "nvidia_pytriton.libs").mkdir()
    return install.TritonInstall(server / "bin" / "tritonserver", server, root / "nvidia_pytriton.libs")


def test_prefers_tritonserver_on_path(tmp_path, monkeypatch):
    exe = tmp_path / "tritonserver"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = install.find_tritonserver()
    assert found.binary == exe and not found.bundled


def test_falls_back_to_bundled_then_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    bundle = fake_bundle(tmp_path)
    monkeypatch.setattr(install, "_bundled_root", lambda: bundle.bundled_root)
    assert install.find_tritonserver() == bundle
    monkeypatch.setattr(install, "_bundled_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-pytriton==0.7.0"):
        install.find_tritonserver()


def test_backend_directory_has_this_pythons_stub_and_is_idempotent(tmp_path):
    bundle = fake_bundle(tmp_path / "site")
    backends = install.prepare_backend_directory(bundle, tmp_path / "state")
    python = backends / "python"
    assert backends == tmp_path / "state" / "backends"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert (python / "triton_python_backend_stub").read_text().startswith(
        f"python_backend_stubs/{install.python_version_tag()}/")
    mtimes = {p.name: p.stat().st_mtime_ns for p in python.iterdir()}
    install.prepare_backend_directory(bundle, tmp_path / "state")
    assert {p.name: p.stat().st_mtime_ns for p in python.iterdir()} == mtimes


def test_missing_stub_names_the_available_versions(tmp_path, monkeypatch):
    bundle = fake_bundle(tmp_path)
    monkeypatch.setattr(install, "python_version_tag", lambda: "3.99")
    with pytest.raises(FileNotFoundError, match=r"Python 3\.99 .*3\.8"):
        install.prepare_backend_directory(bundle, tmp_path / "state")


def test_bundled_env_puts_interpreter_libdir_first(tmp_path):
    bundle = fake_bundle(tmp_path)
    env = install.server_env(bundle, tmp_path / "bin", base={"LD_LIBRARY_PATH": "/old", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        sysconfig.get_config_var("LIBDIR"), str(bundle.libs_dir), "/old"]
    assert env["PATH"].split(os.pathsep) == [str(tmp_path / "bin"), "/usr/bin"]


def test_container_env_keeps_library_path(tmp_path):
    env = install.server_env(install.TritonInstall(Path("/opt/tritonserver/bin/tritonserver")), tmp_path,
                             base={"LD_LIBRARY_PATH": "/opt/lib"})
    assert env["LD_LIBRARY_PATH"] == "/opt/lib"


def test_stub_python_sees_sources_then_this_environment(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bin_dir = install.prepare_stub_python(tmp_path / "state", [src])
    files = sorted(p.relative_to(bin_dir.parent) for p in bin_dir.parent.rglob("*"))
    install.prepare_stub_python(tmp_path / "state", [src])
    assert sorted(p.relative_to(bin_dir.parent) for p in bin_dir.parent.rglob("*")) == files
    # What the stub's embedded Python does: find `python3` on PATH, honour its pyvenv.cfg.
    show_path = "import sys, json; print(json.dumps(sys.path))"
    out = subprocess.run([bin_dir / "python3", "-I", "-c", show_path],
                         capture_output=True, text=True, check=True).stdout
    path = json.loads(out)
    site_packages = sysconfig.get_paths()["purelib"]
    assert str(src) in path and site_packages in path
    assert path.index(str(src)) < path.index(site_packages)


def test_state_dir_is_the_checkouts_run_folder_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MULTILORA_STATE_DIR", raising=False)
    assert install.default_state_dir() == install.REPO_ROOT / ".run"
    monkeypatch.setenv("MULTILORA_STATE_DIR", str(tmp_path))
    assert install.default_state_dir() == tmp_path
