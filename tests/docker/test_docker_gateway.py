"""The gateway's blocks in docker/: the image installs it, compose and the KServe pod start it with a
command line it accepts, pointed at Triton's gRPC port and (for KServe v2 HTTP) Triton's HTTP port,
draining as long as Triton does, within the time the orchestrator gives them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from multilora_client.gateway.__main__ import parse_args

DOCKER = Path(__file__).resolve().parents[2] / "docker"
MODULE = ["python3", "-m", "multilora_client.gateway"]


def test_the_image_installs_the_gateway_extra_and_exposes_its_port():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r'pip install --no-cache-dir "\./client\[gateway\]"', text)
    assert "9000" in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()


def test_compose_gateway_calls_the_triton_service():
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    gateway, triton = services["gateway"], services["triton"]
    assert gateway["command"][:3] == MODULE and gateway["image"] == triton["image"]
    args = parse_args(gateway["command"][3:])
    host, port = args.triton_grpc.split(":")
    assert host == "triton" and any(p.split()[0].endswith(f"{port}:{port}") for p in triton["ports"])
    assert args.host == "0.0.0.0" and gateway["ports"][0].split()[0] == f"{args.port}:{args.port}"
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert f"localhost:{args.port}/health" in " ".join(gateway["healthcheck"]["test"])
    http_port = args.triton_http.rsplit(":", 1)[1]
    assert args.triton_http == f"http://triton:{http_port}" and any(
        p.split()[0].endswith(f"{http_port}:{http_port}") for p in triton["ports"])
    exit_timeout = re.search(r'"--exit-timeout-secs", "(\d+)"', (DOCKER / "Dockerfile").read_text()).group(1)
    assert args.drain_timeout == float(exit_timeout)
    for service in (gateway, triton):  # compose kills after stop_grace_period: drain time plus grace
        assert int(service["stop_grace_period"].rstrip("s")) >= args.drain_timeout + 5


def kserve_runtime() -> dict:
    return next(d for d in yaml.safe_load_all((DOCKER / "kserve" / "multilora.yaml").read_text())
                if d["kind"] == "ServingRuntime")


def test_kserve_gateway_container_calls_triton_in_the_same_pod():
    triton, gateway = kserve_runtime()["spec"]["containers"]
    assert gateway["name"] == "gateway" and gateway["image"] == triton["image"] and gateway["command"] == MODULE
    args = parse_args(gateway["args"])
    grpc_port = next(a.split("=")[1] for a in triton["args"] if a.startswith("--grpc-port="))
    assert args.triton_grpc == f"127.0.0.1:{grpc_port}"
    http_port = next(a.split("=")[1] for a in triton["args"] if a.startswith("--http-port="))
    exit_timeout = next(a.split("=")[1] for a in triton["args"] if a.startswith("--exit-timeout-secs="))
    assert args.triton_http == f"http://127.0.0.1:{http_port}" and args.drain_timeout == float(exit_timeout)
    isvc = next(d for d in yaml.safe_load_all((DOCKER / "kserve" / "multilora.yaml").read_text())
                if d["kind"] == "InferenceService")
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= args.drain_timeout + 5
    assert args.port not in {p["containerPort"] for p in triton["ports"]}
    assert gateway["ports"][0]["containerPort"] == args.port == gateway["readinessProbe"]["httpGet"]["port"]


def test_kserve_gateway_container_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install -r docker/requirements-lint.txt)")
    gateway = kserve_runtime()["spec"]["containers"][1]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "multilora-predictor"},
           "spec": {"containers": [gateway]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
