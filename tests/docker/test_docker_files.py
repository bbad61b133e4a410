"""Offline checks of docker/: what can be linted or parsed without Docker, a GPU or a cluster.

hadolint (Dockerfile), the compose-spec JSON schema (docker-compose.yml), Kubernetes core schemas
(the PVCs, and the pod that the InferenceService becomes), plus consistency with the rest of the
repository: the container's config.pbtxt serves the same inputs/outputs, its parameters parse,
every COPY source exists, and the pins match requirements.txt. Linters that are not installed
(docker/requirements-lint.txt, installed by `make install`) skip with the reason.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from multilora.config import EngineConfig

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
KSERVE = DOCKER / "kserve" / "multilora.yaml"


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).is_file():
        pytest.skip(f"{name} is not installed (pip install -r docker/requirements-lint.txt)")
    return path


def model_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# -- Dockerfile ---------------------------------------------------------------------------------
def test_hadolint_dockerfile():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_lets_it_through():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}", text, re.M)
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert "model_repository/lora_llm/1/model.py" in sources, "model.py comes from the one in the repository"
    allowed = [line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for src in sources:
        assert (REPO / src).exists(), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by the .dockerignore"
    assert not (DOCKER / "model_repository" / "lora_llm" / "1" / "model.py").exists(), "no second copy in git"


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=!\[ ]", line, maxsplit=1)[0].lower()
            out[name] = line[len(name):].strip()
    return out


def test_runtime_pins_follow_requirements_txt():
    project, runtime = pins(REPO / "requirements.txt"), pins(DOCKER / "requirements-runtime.txt")
    for name, spec in runtime.items():
        if name in project:
            assert spec == project[name], f"{name}: docker has {spec!r}, requirements.txt {project[name]!r}"
    torch_arg = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert project["torch"] == f"=={torch_arg}"


# -- the container's model repository -----------------------------------------------------------
def test_container_config_serves_the_same_model():
    ours, theirs = model_config(DOCKER / "model_repository/lora_llm/config.pbtxt"), \
        model_config(REPO / "model_repository/lora_llm/config.pbtxt")
    assert list(ours.input) == list(theirs.input)
    assert list(ours.output) == list(theirs.output)
    assert (ours.name, ours.backend, ours.max_batch_size) == (theirs.name, theirs.backend, theirs.max_batch_size)
    assert ours.model_transaction_policy.decoupled


def test_container_config_parameters_parse():
    config = model_config(DOCKER / "model_repository/lora_llm/config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    engine = EngineConfig.from_parameters(params, base_dir="/models/lora_llm")
    assert engine.base_model == "meta-llama/Llama-3.1-8B-Instruct", "a Hub id stays a Hub id"
    assert engine.allow_hub_download and engine.adapter_dir == "/adapters"


# -- docker-compose.yml -------------------------------------------------------------------------
def test_compose_file_against_the_compose_spec():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_serves_a_gpu_with_adapters_and_the_token_from_the_environment():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["triton"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert service["environment"]["HF_TOKEN"].startswith("${HF_TOKEN:?"), "no token in the file, fail if unset"
    assert any(v.endswith(":/adapters:ro") for v in service["volumes"])
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert {p.split(":")[1].split()[0] for p in service["ports"]} == {"8000", "8001", "8002"}
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])


# -- KServe -------------------------------------------------------------------------------------
def kserve_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KSERVE.read_text())
            if doc["kind"] in ("ServingRuntime", "InferenceService")} | \
        {f"pvc/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(KSERVE.read_text())
         if doc["kind"] == "PersistentVolumeClaim"}


def test_inference_service_shape():
    docs = kserve_documents()
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    container = runtime["spec"]["containers"][0]
    http_port = int(next(a.split("=")[1] for a in container["args"] if a.startswith("--http-port=")))
    assert model["readinessProbe"]["httpGet"]["port"] == http_port
    assert "--model-repository=/models" in container["args"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in predictor["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {k.split("/", 1)[1] for k in docs if k.startswith("pvc/")}
    mounts = {m["mountPath"]: m["name"] for m in model["volumeMounts"]}
    assert mounts["/adapters"] == "adapters", "adapter_dir of docker/model_repository is /adapters"


def test_kubernetes_core_schemas():
    """PVCs as they are; the runtime container + the model's container fields + the predictor's
    volumes as the pod KServe makes of them (the KServe CRDs have no offline schema)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -r docker/requirements-lint.txt)")
    docs = kserve_documents()
    predictor = docs["InferenceService"]["spec"]["predictor"]
    container = dict(docs["ServingRuntime"]["spec"]["containers"][0])
    container.update({k: v for k, v in predictor["model"].items()
                      if k not in ("runtime", "protocolVersion", "modelFormat", "storageUri")})
    container["env"] = docs["ServingRuntime"]["spec"]["containers"][0]["env"] + predictor["model"]["env"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "multilora-predictor"},
           "spec": {"containers": [container], "volumes": predictor["volumes"]}}
    version = kubernetes_validate.latest_version()
    for name, doc in [("pod", pod)] + [(k, v) for k, v in docs.items() if k.startswith("pvc/")]:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path
