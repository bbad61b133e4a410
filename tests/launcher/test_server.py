"""`multilora.launcher.server` without a server: the command line, addresses and URLs."""
from __future__ import annotations

import socket

from multilora.launcher import server as srv


def test_build_command_has_addresses_ports_repository_backends_and_our_shm_prefix(tmp_path):
    endpoints = srv.Endpoints(1, 2, 3)
    cmd = srv.build_command(tmp_path, endpoints, ["--log-verbose=1"], binary="/x/tritonserver",
                            backend_directory=tmp_path / "backends", exit_timeout_secs=2, shm_prefix="multilora_7_ab_")
    assert cmd == [
        "/x/tritonserver", f"--model-repository={tmp_path.resolve()}",
        "--http-address=127.0.0.1", "--http-port=1", "--grpc-address=127.0.0.1", "--grpc-port=2",
        "--metrics-port=3", f"--backend-directory={(tmp_path / 'backends').resolve()}",
        "--exit-timeout-secs=2", "--backend-config=python,shm-region-prefix-name=multilora_7_ab_",
        "--log-verbose=1",
    ]


def test_build_command_leaves_server_defaults_alone(tmp_path):
    cmd = srv.build_command(tmp_path, srv.Endpoints(1, 2, 3))
    assert cmd[0] == "tritonserver"
    assert not any(a.startswith(("--backend-directory", "--exit-timeout-secs", "--backend-config")) for a in cmd)


def test_loopback_by_default_and_urls_that_reach_any_address():
    assert srv.Endpoints(1, 2, 3).url == "http://127.0.0.1:1"
    exposed = srv.Endpoints(8000, 8001, 8002, http_address="0.0.0.0", grpc_address="::")
    assert "--http-address=0.0.0.0" in exposed.args() and "--grpc-address=::" in exposed.args()
    assert exposed.url == "http://127.0.0.1:8000" and exposed.grpc_url == "[::1]:8001"
    assert exposed.metrics_url == "http://127.0.0.1:8002/metrics"
    assert srv.Endpoints(1, 2, 3, http_address="10.0.0.5").url == "http://10.0.0.5:1"


def test_free_port_is_bindable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", srv.free_port()))
