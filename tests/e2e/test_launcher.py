"""`multilora.server_launcher`: command/env building without a server, then a real tritonserver
serving a tiny decoupled echo model written into tmp_path."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sysconfig
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from multilora import server_launcher as sl

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
import multilora.server_launcher


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


def fake_bundle(root: Path) -> sl.TritonInstall:
    """The wheel's layout with empty files: enough for the backend-folder logic."""
    server = root / "pytriton" / "tritonserver"
    for rel in ["bin/tritonserver", "backends/python/libtriton_python.so",
                "backends/python/triton_python_backend_utils.py",
                f"python_backend_stubs/{sl.python_version_tag()}/triton_python_backend_stub",
                "python_backend_stubs/3.8/triton_python_backend_stub"]:
        (server / rel).parent.mkdir(parents=True, exist_ok=True)
        (server / rel).write_text(rel)
    (root / "nvidia_pytriton.libs").mkdir()
    return sl.TritonInstall(server / "bin" / "tritonserver", server, root / "nvidia_pytriton.libs")


# --- no server needed -----------------------------------------------------------------------

def test_build_command_has_ports_repository_and_backends(tmp_path):
    cmd = sl.build_command(tmp_path, 1, 2, 3, ["--log-verbose=1"], binary="/x/tritonserver",
                           backend_directory=tmp_path / "backends", exit_timeout_secs=2)
    assert cmd == [
        "/x/tritonserver", f"--model-repository={tmp_path.resolve()}", "--http-port=1",
        "--grpc-port=2", "--metrics-port=3",
        f"--backend-directory={(tmp_path / 'backends').resolve()}",
        "--exit-timeout-secs=2", "--log-verbose=1",
    ]


def test_build_command_leaves_server_defaults_alone(tmp_path):
    cmd = sl.build_command(tmp_path, 1, 2, 3)
    assert cmd[0] == "tritonserver"
    assert not any(a.startswith(("--backend-directory", "--exit-timeout-secs")) for a in cmd)


def test_prefers_tritonserver_on_path(tmp_path, monkeypatch):
    exe = tmp_path / "tritonserver"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    install = sl.find_tritonserver()
    assert install.binary == exe and not install.bundled


def test_falls_back_to_bundled_then_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    bundle = fake_bundle(tmp_path)
    monkeypatch.setattr(sl, "_bundled_root", lambda: bundle.bundled_root)
    assert sl.find_tritonserver() == bundle
    monkeypatch.setattr(sl, "_bundled_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-pytriton==0.7.0"):
        sl.find_tritonserver()


def test_backend_directory_has_this_pythons_stub_and_is_idempotent(tmp_path):
    install = fake_bundle(tmp_path / "site")
    backends = sl.prepare_backend_directory(install, tmp_path / "state")
    python = backends / "python"
    assert backends == tmp_path / "state" / "backends"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert (python / "triton_python_backend_stub").read_text().startswith(
        f"python_backend_stubs/{sl.python_version_tag()}/")
    mtimes = {p.name: p.stat().st_mtime_ns for p in python.iterdir()}
    sl.prepare_backend_directory(install, tmp_path / "state")
    assert {p.name: p.stat().st_mtime_ns for p in python.iterdir()} == mtimes


def test_missing_stub_names_the_available_versions(tmp_path, monkeypatch):
    install = fake_bundle(tmp_path)
    monkeypatch.setattr(sl, "python_version_tag", lambda: "3.99")
    with pytest.raises(FileNotFoundError, match=r"Python 3\.99 .*3\.8"):
        sl.prepare_backend_directory(install, tmp_path / "state")


def test_bundled_env_puts_interpreter_libdir_first(tmp_path):
    install = fake_bundle(tmp_path)
    env = sl.server_env(install, tmp_path / "bin",
                        base={"LD_LIBRARY_PATH": "/old", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        sysconfig.get_config_var("LIBDIR"), str(install.libs_dir), "/old"]
    assert env["PATH"].split(os.pathsep) == [str(tmp_path / "bin"), "/usr/bin"]


def test_container_env_keeps_library_path(tmp_path):
    env = sl.server_env(sl.TritonInstall(Path("/opt/tritonserver/bin/tritonserver")), tmp_path,
                        base={"LD_LIBRARY_PATH": "/opt/lib"})
    assert env["LD_LIBRARY_PATH"] == "/opt/lib"


def test_stub_python_sees_sources_then_this_environment(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bin_dir = sl.prepare_stub_python(tmp_path / "state", [src])
    files = sorted(p.relative_to(bin_dir.parent) for p in bin_dir.parent.rglob("*"))
    sl.prepare_stub_python(tmp_path / "state", [src])
    assert sorted(p.relative_to(bin_dir.parent) for p in bin_dir.parent.rglob("*")) == files
    # What the stub's embedded Python does: find `python3` on PATH, honour its pyvenv.cfg.
    show_path = "import sys, json; print(json.dumps(sys.path))"
    out = subprocess.run([bin_dir / "python3", "-I", "-c", show_path],
                         capture_output=True, text=True, check=True).stdout
    path = json.loads(out)
    site_packages = sysconfig.get_paths()["purelib"]
    assert str(src) in path and site_packages in path
    assert path.index(str(src)) < path.index(site_packages)


def test_free_port_is_bindable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", sl.free_port()))


# --- a real server --------------------------------------------------------------------------

def _server_or_skip(**kwargs) -> sl.TritonServer:
    try:
        return sl.TritonServer(**kwargs)
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
    assert server.process.returncode is not None


def test_failed_start_raises_with_log_tail(tmp_path, state_dir):
    repo = write_model(tmp_path / "repo", BROKEN_MODEL)
    server = _server_or_skip(model_repository=repo, state_dir=state_dir,
                             log_path=tmp_path / "server.log", exit_timeout_secs=1)
    with pytest.raises(sl.ServerStartError, match="echo model refuses to load"):
        server.start()
    assert server.process.poll() is not None
