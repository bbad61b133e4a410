"""The gateway's KServe v2 pass-through (issue 23 item 2): /v2 requests reach Triton's HTTP port
unchanged after the gateway's checks; what crashes tritonserver 2.51 and the operators' APIs never do."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

from multilora.launcher import free_port
from multilora_client.gateway.app import GatewayConfig, create_app
from multilora_client.gateway.kserve import forwarded


class FakeTriton(BaseHTTPRequestHandler):
    """Triton's HTTP port: records what reaches it, answers generate with the body it got."""

    seen: list[tuple[str, str, bytes, str | None]] = []

    def do_GET(self):
        self.seen.append(("GET", self.path, b"", None))
        self._answer(200, b'{"name":"triton","version":"2.51.0"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(("POST", self.path, body, self.headers.get("Inference-Header-Content-Length")))
        if self.path.endswith("/generate_stream"):
            events = b"".join(b'data: {"text_output":"%d"}\n\n' % i for i in range(3))
            return self._answer(200, events, "text/event-stream")
        self._answer(200, json.dumps({"text_output": "ok", "got": len(body)}).encode())

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def triton_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def gateway(triton_http):
    FakeTriton.seen.clear()
    config = GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}", triton_http=triton_http)
    with TestClient(create_app(config)) as client:
        yield client


def test_inference_requests_reach_triton_unchanged(gateway):
    body = b'{"text_input": "Hello", "parameters": {"max_tokens": 2}}'
    answer = gateway.post("/v2/models/lora_llm/generate?x=1", content=body,
                          headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.json() == {"text_output": "ok", "got": len(body)}
    assert FakeTriton.seen == [("POST", "/v2/models/lora_llm/generate?x=1", body, None)]
    binary = b'{"inputs":[]}' + b"\x00\x01raw tensor bytes"
    infer = gateway.post("/v2/models/lora_llm/versions/1/infer", content=binary,
                         headers={"Inference-Header-Content-Length": "13"})
    assert infer.status_code == 200 and FakeTriton.seen[-1][2:] == (binary, "13")
    assert gateway.get("/v2/health/ready").status_code == 200 and gateway.get("/v2").json()["name"] == "triton"
    stream = gateway.post("/v2/models/lora_llm/generate_stream", json={"text_input": "Hello"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert [json.loads(line[6:])["text_output"] for line in stream.text.splitlines() if line] == ["0", "1", "2"]


@pytest.mark.parametrize("body, status", [
    (b'{"text_input": ' + b"[" * 1_000_000 + b'"x"' + b"]" * 1_000_000 + b"}", 400),  # killed 2.51
    (b'{"text_input": "' + b"x" * (6 << 20) + b'"}', 413),  # 6 MB killed it; the cap is 4 MiB
    (b'{"text_input": "\\ud800x"}', 400),
])
def test_bodies_that_break_triton_never_reach_it(gateway, body, status):
    answer = gateway.post("/v2/models/lora_llm/generate", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status and set(answer.json()) == {"error"}, "Triton's own error shape"
    assert FakeTriton.seen == []


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/lora_llm/unload"),
    ("GET", "/v2/models/lora_llm/config"), ("GET", "/v2/models/stats"), ("POST", "/v2/logging"),
    ("POST", "/v2/trace/setting"), ("POST", "/v2/systemsharedmemory/region/x/register"),
    ("DELETE", "/v2/models/lora_llm"),
])
def test_the_operators_apis_are_not_forwarded(gateway, method, path):
    answer = gateway.request(method, path, json={})
    assert answer.status_code == 403 and "for operators, on Triton's own port" in answer.json()["error"]
    assert FakeTriton.seen == [] and not forwarded(method, path)


def test_without_triton_http_v2_is_off_and_a_silent_triton_is_a_503():
    with TestClient(create_app(GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}"))) as off:
        answer = off.post("/v2/models/lora_llm/generate", json={"text_input": "x"})
        assert answer.status_code == 404 and "--triton-http" in answer.json()["error"]
    config = GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}", triton_http=f"http://127.0.0.1:{free_port()}")
    with TestClient(create_app(config)) as down:
        answer = down.post("/v2/models/lora_llm/generate", json={"text_input": "x"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert answer.json()["error"].startswith("Triton's HTTP endpoint does not answer")
