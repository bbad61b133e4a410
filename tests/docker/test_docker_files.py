"""Offline checks of docker/: what can be linted or parsed without Docker, a GPU or a cluster.

hadolint (Dockerfile), the compose-spec JSON schema (docker-compose.yml), Kubernetes core schemas
(the PVCs, and the pod that the InferenceService becomes), plus consistency with the rest of the
repository: the container's config.pbtxt serves the same inputs/outputs, its parameters parse,
every COPY source exists, the pins match requirements.txt, torch is built for the image's CUDA,
the package is installed with its kernels (a wheel built from exactly what the image copies), and
the image, Compose and KServe run the supervising launcher with a health check that sends a real
request. Linters that are not installed (docker/requirements-lint.txt, installed by
`make install`) skip with the reason.
"""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
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


# CUDA of each NGC tritonserver release this file has used, from NVIDIA's release notes
# (docs.nvidia.com/deeplearning/triton-inference-server/release-notes/rel-YY-MM.html).
NGC_CUDA = {"24.10": (12, 6), "26.05": (13, 2)}
# The first release whose JSON parser is iterative (triton-inference-server/common#156): before
# it, an HTTP body nested 1,000,000 deep crashes tritonserver (issue 10 item 11).
FIRST_RELEASE_PARSING_DEEP_JSON = (26, 5)


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M).group(1)


def dockerfile_instructions(keyword: str) -> list[str]:
    """Each `keyword` instruction with its continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return re.findall(rf"^{keyword} (.+)$", joined, re.M)


# -- Dockerfile ---------------------------------------------------------------------------------
def test_hadolint_dockerfile():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_lets_it_through():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}", text, re.M)
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
    assert project["torch"] == f"=={dockerfile_arg('TORCH_VERSION')}"


def test_triton_release_parses_deep_json_and_torch_matches_its_cuda():
    image = dockerfile_arg("TRITON_IMAGE")
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert release, image
    year_month = (int(release.group(1)), int(release.group(2)))
    assert year_month >= FIRST_RELEASE_PARSING_DEEP_JSON, f"{image} crashes on deeply nested JSON bodies"
    image_cuda = NGC_CUDA[f"{release.group(1)}.{release.group(2)}"]
    build = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", dockerfile_arg("TORCH_INDEX_URL"))
    assert build, "torch must come from a CUDA wheel index, not the CPU one"
    torch_cuda = (int(build.group(1)), int(build.group(2)))
    assert torch_cuda[0] == image_cuda[0] and torch_cuda <= image_cuda, \
        f"torch for CUDA {torch_cuda} in an image with CUDA {image_cuda}"


def declared_kernel_files() -> set[str]:
    """Kernel files (.cu, .ptx) of the checkout that pyproject.toml declares as package data,
    as paths inside the wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    where = REPO / config["tool"]["setuptools"]["packages"]["find"]["where"][0]
    found = set()
    for package, patterns in config["tool"]["setuptools"].get("package-data", {}).items():
        folder = where / package.replace(".", "/")
        for pattern in patterns:
            found |= {str(p.relative_to(where)) for p in folder.glob(pattern) if p.suffix in (".cu", ".ptx")}
    return found


def docker_build_context(dest: Path) -> Path:
    """What the image's `pip install .` sees: the COPY sources before it, without what the
    .dockerignore leaves out."""
    dest.mkdir()
    excluded = [line.split("/")[-1] for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line and not line.startswith(("#", "!")) and line != "*"]
    for copy in dockerfile_instructions("(?:COPY|RUN)"):
        if "pip install" in copy and re.search(r"--no-deps \.(\s|$)", copy):
            return dest
        if copy.split()[-1] == "./" or copy.split()[-1].startswith("./"):
            for src in copy.split()[:-1]:
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, dest / src, ignore=shutil.ignore_patterns(*excluded))
                elif (REPO / src).is_file() and not any(fnmatch.fnmatch(src, e) for e in excluded):
                    shutil.copy2(REPO / src, dest / Path(src).name)
    raise AssertionError("the Dockerfile has no `pip install --no-deps .`")


def test_image_installs_the_package_and_its_kernels(tmp_path):
    installs = [r for r in dockerfile_instructions("RUN") if "pip install" in r and re.search(r" \.(\s|$)", r)]
    assert len(installs) == 1 and " -e " not in installs[0], "a real install of the package, not an editable one"
    assert "files('multilora')" in installs[0] and ".ptx" in installs[0], "the build checks the installed kernels"
    context = docker_build_context(tmp_path / "context")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(context)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("multilora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "multilora/launcher/health.py" in names and "multilora/engine/llm_engine.py" in names
    kernels = declared_kernel_files()
    if not any(k.endswith(".ptx") for k in kernels):
        pytest.skip("pyproject.toml declares no kernel package data in this checkout (issue 11 item 2)")
    assert kernels <= names, f"missing from the image's install: {sorted(kernels - names)}"


def test_image_runs_the_supervising_launcher_with_a_real_health_check():
    (healthcheck,) = dockerfile_instructions("HEALTHCHECK")
    assert '"-m", "multilora.launcher.health", "--url", "http://127.0.0.1:8000"' in healthcheck
    (cmd,) = dockerfile_instructions("CMD")
    assert cmd.startswith('["python3", "-m", "multilora.launcher", "--model-repository", "/models"')
    assert '"--http-address", "0.0.0.0"' in cmd and '"--http-port", "8000"' in cmd


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
    assert {p.split()[0] for p in service["ports"]} == {"127.0.0.1:8000:8000", "127.0.0.1:8001:8001",
                                                         "127.0.0.1:8002:8002"}, "published on loopback only"
    assert service["healthcheck"]["test"][1:4] == ["python3", "-m", "multilora.launcher.health"]


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
    container = runtime["spec"]["containers"][0]
    assert container["args"][:3] == ["python3", "-m", "multilora.launcher"]
    assert "--http-address=0.0.0.0" in container["args"] and "--model-repository=/models" in container["args"]
    http_port = int(next(a.split("=")[1] for a in container["args"] if a.startswith("--http-port=")))
    assert model["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http_port}
    for probe in (model["readinessProbe"], model["livenessProbe"]):
        command = probe["exec"]["command"]
        assert command[:3] == ["python3", "-m", "multilora.launcher.health"]
        assert command[command.index("--url") + 1] == f"http://127.0.0.1:{http_port}"
        # The check makes two requests of --timeout seconds each; Kubernetes must wait for both.
        assert probe["timeoutSeconds"] > 2 * float(command[command.index("--timeout") + 1])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in predictor["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {k.split("/", 1)[1] for k in docs if k.startswith("pvc/")}
    mounts = {m["mountPath"]: m["name"] for m in model["volumeMounts"]}
    assert mounts["/adapters"] == "adapters", "adapter_dir of docker/model_repository is /adapters"


def test_kubernetes_core_schemas():
    """PVCs as they are; the runtime container + the model's container fields + the predictor's
    volumes as the pod KServe makes of them (the KServe CRDs have no offline schema)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install -r docker/requirements-lint.txt)")
    docs = kserve_documents()
    predictor = docs["InferenceService"]["spec"]["predictor"]
    container = dict(docs["ServingRuntime"]["spec"]["containers"][0])
    container.update({k: v for k, v in predictor["model"].items()
                      if k not in ("runtime", "protocolVersion", "modelFormat", "storageUri")})
    container["env"] = docs["ServingRuntime"]["spec"]["containers"][0]["env"] + predictor["model"]["env"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "multilora-predictor"},
           "spec": {"containers": [container], "volumes": predictor["volumes"]}}
    version = kubernetes_validate.latest_version()
    for doc in [pod] + [v for k, v in docs.items() if k.startswith("pvc/")]:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path
