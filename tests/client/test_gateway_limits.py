"""The gateway's body checks: oversized requests get 413, and JSON nested too deep, integers too long to
read and lone surrogates get 400, in each API's error shape, before any route reads them; bodies within
the cap reach the app unchanged (declared or chunked). Also the shapes of the gateway's own errors."""
from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from multilora.launcher import free_port
from multilora_client.gateway.app import GatewayConfig, create_app
from multilora_client.gateway.limits import BodyLimit


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


@pytest.fixture
def client() -> TestClient:
    app = Starlette(routes=[Route("/v1/x", echo, methods=["POST"]), Route("/generate", echo, methods=["POST"])])
    return TestClient(BodyLimit(app, max_bytes=1000))


def test_bodies_within_the_cap_pass_unchanged(client):
    assert client.post("/v1/x", content=b"a" * 1000).json() == {"bytes": 1000}
    chunked = client.post("/generate", content=iter([b"a" * 400, b"b" * 400]))  # no Content-Length
    assert chunked.json() == {"bytes": 800}


def test_larger_bodies_get_413_in_the_apis_shape(client):
    openai = client.post("/v1/x", content=b"a" * 1001)
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "request_too_large"
    assert "limit of 1000 bytes" in openai.json()["error"]["message"]
    tgi = client.post("/generate", content=iter([b"a" * 600, b"b" * 600]))  # chunked: counted as it comes
    assert tgi.status_code == 413 and tgi.json()["error_type"] == "validation"


def test_the_gateway_app_applies_its_configured_cap():
    with TestClient(create_app(GatewayConfig(max_body_bytes=2048))) as gateway:
        answer = gateway.post("/generate", json={"inputs": "x" * 5000, "parameters": {"adapter_id": "a"}})
    assert answer.status_code == 413 and "2048 bytes" in answer.json()["error"]


# -- issue 23 item 6: bodies that used to end in a 500 or FastAPI's {"detail": ...} ----------------
@pytest.fixture(scope="module")
def gateway() -> TestClient:
    """The real app; its Triton is a port where nothing listens (these bodies never reach it)."""
    with TestClient(create_app(GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}", base_model_name="base"))) as app:
        yield app


LONE = "lone UTF-16 surrogate (\\ud800 at character 0); text must be valid Unicode"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "base", "prompt": "\\ud800x"}', "prompt"),
    ("/v1/chat/completions", '{"model": "base", "messages": [{"role": "user", "content": "\\ud800x"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"model": "base", "prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
])
def test_lone_surrogates_are_refused_by_field_in_openais_shape(gateway, path, body, param):
    answer = gateway.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": f"invalid '{param}': contains a {LONE}: an escape from \\ud800 to "
                                                  "\\udfff is only valid as half of a surrogate pair",
                                       "type": "invalid_request_error", "param": param, "code": "invalid_parameter"}}


def test_lone_surrogates_are_refused_in_tgis_shape_and_pairs_pass(gateway):
    answer = gateway.post("/generate", content='{"inputs": "\\ud800x"}', headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error_type"] == "validation"
    assert answer.json()["error"].startswith(f"invalid 'inputs': contains a {LONE}")
    pair = gateway.post("/generate", content='{"inputs": "\\ud83d\\ude00"}',
                        headers={"Content-Type": "application/json"})
    assert pair.status_code == 503, "a surrogate pair is one character (U+1F600): on to Triton, which is down here"


def test_integers_too_long_to_read_are_refused_by_field(gateway):
    digits = "1" * 5001
    openai = gateway.post("/v1/completions", content=f'{{"model": "base", "prompt": "x", "max_tokens": {digits}}}',
                          headers={"Content-Type": "application/json"})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "max_tokens"
    assert openai.json()["error"]["message"] == ("invalid 'max_tokens': an integer of 5001 digits is out of range for "
                                                 "any field (numbers of more than 4300 digits are not even read)")
    tgi = gateway.post("/generate", content=f'{{"inputs": "x", "parameters": {{"seed": -{digits}}}}}',
                       headers={"Content-Type": "application/json"})
    assert tgi.status_code == 422 and tgi.json()["error"].startswith("invalid 'parameters.seed': an integer of 5001")


@pytest.mark.parametrize("depth", [33, 1_000_000])
def test_deeply_nested_bodies_are_refused_before_any_route(gateway, depth):
    body = '{"model": "base", "prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}"
    answer = gateway.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    assert answer.json()["error"]["message"] == ("the request body is JSON nested more than 32 levels deep; no "
                                                 "request needs that many")


def test_parse_errors_and_unknown_routes_are_in_each_apis_shape(gateway):
    bad = gateway.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"] == {
        "message": "the request body is not valid JSON: Expecting value at character 10",
        "type": "invalid_request_error", "param": None, "code": "invalid_json"}
    missing = gateway.post("/v1/nope", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.json()["error"]["message"].startswith("POST /v1/nope: Not Found (this gateway serves")
    method = gateway.get("/v1/chat/completions")
    assert method.status_code == 405 and method.json()["error"]["code"] == "method_not_allowed"
    assert method.headers["allow"] == "POST"
    tgi = gateway.get("/nope")
    assert tgi.status_code == 404 and tgi.json()["error_type"] == "validation" and "detail" not in tgi.json()


def test_triton_down_is_503_with_retry_after_in_each_apis_shape(gateway):
    openai = gateway.post("/v1/completions", json={"model": "sql", "prompt": "x"})
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "service_unavailable"
    tgi = gateway.post("/generate", json={"inputs": "x"})
    assert tgi.status_code == 503 and tgi.json()["error_type"] == "unhealthy"
    health = gateway.get("/health")
    assert health.status_code == 503
    assert {openai.headers["retry-after"], tgi.headers["retry-after"], health.headers["retry-after"]} == {"5"}
