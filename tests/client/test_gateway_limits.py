"""The gateway's body cap: oversized requests get 413 in each API's error shape, before any route
reads them; bodies within the cap reach the app unchanged (declared or chunked)."""
from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

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
