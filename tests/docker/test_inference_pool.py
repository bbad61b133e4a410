"""Offline checks of docker/kserve/inference-pool.yaml (adapter-aware routing over the KServe replicas).

Kubernetes core objects against the Kubernetes schemas (kubernetes-validate); the InferencePool and
the HTTPRoute against JSON schemas taken from their CRDs' openAPIV3Schema (tests/docker/schemas:
the released CRDs, Apache-2.0), and the endpoint picker's configuration against a schema written
from llm-d-router's Go types, each with check-jsonschema; then what no schema can see: the
references between the objects, their ports, and that the engine mapping names metrics our server
publishes. The CRDs' CEL rules (x-kubernetes-validations) need an API server; the two the pool
has are checked here by hand. Nothing here ran on a cluster (docs/scale-out.md).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from fake_triton import FakeTriton
from multilora.events import EngineSnapshot
from multilora.triton.metrics import LoraMetrics

from .test_docker_files import tool

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SCHEMAS = Path(__file__).parent / "schemas"
POOL_FILE = DOCKER / "kserve" / "inference-pool.yaml"
CORE_KINDS = ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service")
ENGINE_LABEL = "llm-d.ai/engine-type"  # the core-metrics-extractor's engineLabelKey (its default)


def documents() -> dict[str, dict]:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(POOL_FILE.read_text())}
    assert len(docs) == len(list(yaml.safe_load_all(POOL_FILE.read_text()))), "one object of each kind"
    return docs


def epp_config() -> dict:
    (text,) = documents()["ConfigMap"]["data"].values()
    return yaml.safe_load(text)


def kserve(kind: str) -> dict:
    return next(d for d in yaml.safe_load_all((DOCKER / "kserve" / "multilora.yaml").read_text()) if d["kind"] == kind)


def check_jsonschema(schema: dict, document: dict, tmp_path: Path) -> None:
    schema_file, document_file = tmp_path / "schema.json", tmp_path / "document.json"
    schema_file.write_text(json.dumps(schema))
    document_file.write_text(json.dumps(document))
    result = subprocess.run([tool("check-jsonschema"), "--schemafile", str(schema_file), str(document_file)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def crd_schema(file_name: str, api_version: str) -> dict:
    """The JSON schema of one served version of a CRD: its openAPIV3Schema (OpenAPI v3's subset of
    JSON schema; the x-kubernetes-* keywords are ignored by a JSON schema validator)."""
    crd = yaml.safe_load((SCHEMAS / file_name).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return {"$schema": "http://json-schema.org/draft-04/schema#", **served["schema"]["openAPIV3Schema"]}


# -- schemas --------------------------------------------------------------------------------------
def test_kubernetes_core_objects_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install -r docker/requirements-lint.txt)")
    docs = documents()
    assert set(CORE_KINDS) <= docs.keys()
    for kind in CORE_KINDS:
        kubernetes_validate.validate(docs[kind], kubernetes_validate.latest_version(), strict=True)


def test_inference_pool_against_its_crd(tmp_path):
    pool = documents()["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    check_jsonschema(crd_schema("inference.networking.k8s.io_inferencepools.yaml", pool["apiVersion"]), pool, tmp_path)
    # Its CEL rules: a Service reference has a port; target port numbers are unique.
    picker = pool["spec"]["endpointPickerRef"]
    assert picker.get("kind", "Service") != "Service" or "port" in picker
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers))


def test_http_route_against_its_crd(tmp_path):
    route = documents()["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    check_jsonschema(crd_schema("gateway.networking.k8s.io_httproutes.yaml", route["apiVersion"]), route, tmp_path)


def test_endpoint_picker_config_against_its_schema(tmp_path):
    check_jsonschema(json.loads((SCHEMAS / "endpointpickerconfig.schema.json").read_text()), epp_config(), tmp_path)


def test_the_schemas_refuse_what_they_should(tmp_path):
    """The derived schemas are not vacuous: a wrong field fails each of them."""
    pool = documents()["InferencePool"]
    bad_pool = {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 70000}]}}
    config = epp_config()
    bad_config = {**config, "plugins": config["plugins"] + [{"type": "metrics-data-source", "parameters": {"prot": 1}}]}
    route = documents()["HTTPRoute"]
    bad_route = {**route, "spec": {**route["spec"], "rules": [{"matches": [{"path": {"type": "Prefix"}}]}]}}
    for schema, document in [
        (crd_schema("inference.networking.k8s.io_inferencepools.yaml", pool["apiVersion"]), bad_pool),
        (json.loads((SCHEMAS / "endpointpickerconfig.schema.json").read_text()), bad_config),
        (crd_schema("gateway.networking.k8s.io_httproutes.yaml", route["apiVersion"]), bad_route),
    ]:
        with pytest.raises(AssertionError):
            check_jsonschema(schema, document, tmp_path)


# -- what ties the objects together -------------------------------------------------------------
def plugin_names(config: dict) -> set[str]:
    return {p.get("name", p["type"]) for p in config["plugins"]}


def test_every_plugin_reference_names_a_declared_plugin():
    config = epp_config()
    declared = plugin_names(config)
    refs = [p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]]
    refs += [p["pluginRef"] for p in config["requestHandler"]["parsers"]]
    for source in config["dataLayer"]["sources"]:
        refs += [source["pluginRef"]] + [e["pluginRef"] for e in source["extractors"]]
    assert set(refs) <= declared
    (profile,) = config["schedulingProfiles"]
    scorers = {p["pluginRef"] for p in profile["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= scorers


def test_the_picker_scrapes_tritons_metrics_port_of_the_pods_the_pool_selects():
    docs, config = documents(), epp_config()
    runtime, isvc = kserve("ServingRuntime"), kserve("InferenceService")
    triton, gateway = runtime["spec"]["containers"]
    source = next(p for p in config["plugins"] if p["type"] == "metrics-data-source")["parameters"]
    metrics_port = int(next(a.split("=")[1] for a in triton["args"] if a.startswith("--metrics-port=")))
    assert source["port"] == metrics_port and source["path"] == "/metrics"
    assert "--http-address=0.0.0.0" in triton["args"], "the metrics port follows the HTTP address"
    pool = docs["InferencePool"]["spec"]
    assert [p["number"] for p in pool["targetPorts"]] == [gateway["ports"][0]["containerPort"]], \
        "requests go to the OpenAI gateway: the EPP reads `model` from OpenAI bodies"
    # KServe labels each predictor pod with its InferenceService's name (pkg/constants:
    # InferenceServicePodLabelKey), and adds spec.predictor.labels.
    assert pool["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    (engine,) = extractor["engineConfigs"]
    assert isvc["spec"]["predictor"]["labels"][extractor.get("engineLabelKey", ENGINE_LABEL)] == engine["name"]


def test_the_pool_the_picker_and_the_route_refer_to_each_other():
    docs = documents()
    pool, service, deployment, route = docs["InferencePool"], docs["Service"], docs["Deployment"], docs["HTTPRoute"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-group"] == pool["apiVersion"].split("/")[0]
    picker = pool["spec"]["endpointPickerRef"]
    assert picker["name"] == service["metadata"]["name"]
    assert picker["port"]["number"] == int(args["grpc-port"]) in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    mount = container["volumeMounts"][0]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert Path(args["config-file"]).parent == Path(mount["mountPath"])
    assert Path(args["config-file"]).name in docs["ConfigMap"]["data"]
    probe_port = container["readinessProbe"]["grpc"]["port"]
    assert probe_port == int(args["grpc-health-port"]) == container["livenessProbe"]["grpc"]["port"]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    role, binding = docs["Role"], docs["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A metric spec as the core-metrics-extractor reads it: name{label=value,...}."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?", spec)
    labels = dict(pair.split("=") for pair in match.group(2).split(",")) if match.group(2) else {}
    return match.group(1), {k.strip(): v.strip().strip('"') for k, v in labels.items()}


def test_the_engine_mapping_names_metrics_the_server_publishes():
    triton = FakeTriton()
    metrics = LoraMetrics(triton, max_cpu_loras=8)
    metrics.state(EngineSnapshot(running=1, waiting=0, kv_blocks_used=4, kv_blocks_total=16,
                                 running_adapters=("sql",), waiting_adapters=(), device_capacity=4, host_capacity=8,
                                 device=(("sql", True),), host=(("sql", True),)))
    samples = triton.samples()
    extractor = next(p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    (engine,) = extractor["engineConfigs"]
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        name, labels = parse_spec(engine[field])
        matching = [s for s, sample_labels in samples if s == name and labels.items() <= dict(sample_labels).items()]
        assert len(matching) == 1, f"{field}: {engine[field]} matches {len(matching)} series"
    name, _ = parse_spec(engine["loraSpec"])
    (info,) = [dict(labels) for s, labels in samples if s == name]
    assert set(info) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
