"""`multilora.launcher.probes` against a small stand-in HTTP server."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from multilora.launcher import probes
from multilora.launcher.__main__ import banner

METRICS_BUSY = """# HELP lora_scheduler_state Requests running and waiting
lora_scheduler_state{state="running"} 2
lora_scheduler_state{state="waiting"} 0
lora_scheduler_state{state="kv_blocks_total"} 512
nv_inference_pending_request_count{model="lora_llm",version="1"} 0
"""


class Stand_in(BaseHTTPRequestHandler):
    routes: dict = {}

    def _answer(self):
        status, body = self.routes.get(self.path, (404, b""))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stand_in)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Stand_in.routes
    server.shutdown()
    Stand_in.routes.clear()


def test_generate_once_passes_on_text_and_says_why_otherwise(stand_in):
    url, routes = stand_in
    routes["/v2/models/lora_llm/generate"] = (200, json.dumps({"text_output": "x"}).encode())
    assert probes.generate_once(url, "lora_llm", timeout=2) is None
    routes["/v2/models/lora_llm/generate"] = (
        400, json.dumps({"error": "Stub process 'lora_llm_0_0' is not healthy."}).encode())
    assert probes.generate_once(url, "lora_llm", timeout=2) == \
        "lora_llm answered HTTP 400: Stub process 'lora_llm_0_0' is not healthy."
    assert "no answer from http://127.0.0.1:9" in probes.generate_once("http://127.0.0.1:9", "lora_llm", timeout=2)


def test_idle_needs_our_engine_gauges_at_zero(stand_in):
    url, routes = stand_in
    routes["/metrics"] = (200, METRICS_BUSY.encode())
    assert probes.is_idle(url + "/metrics") is False
    routes["/metrics"] = (200, METRICS_BUSY.replace('"running"} 2', '"running"} 0').encode())
    assert probes.is_idle(url + "/metrics") is True
    routes["/metrics"] = (200, (METRICS_BUSY.replace('"running"} 2', '"running"} 0')
                                .replace('version="1"} 0', 'version="1"} 3')).encode())
    assert probes.is_idle(url + "/metrics") is False, "requests queued in Triton"
    routes["/metrics"] = (200, b'nv_inference_pending_request_count{model="echo",version="1"} 0\n')
    assert probes.is_idle(url + "/metrics") is None, "no engine gauges: unknown"
    assert probes.is_idle("http://127.0.0.1:9/metrics") is None


def test_http_status_is_none_when_nothing_answers(stand_in):
    url, routes = stand_in
    routes["/v2/health/ready"] = (400, b"")
    assert probes.http_status(url + "/v2/health/ready", 2) == 400
    assert probes.server_ready(url) is False
    assert probes.http_status("http://127.0.0.1:9/", 2) is None


def test_the_start_banners_example_names_an_adapter_the_server_serves(stand_in):
    """Issue 23 item 7: the banner's example used adapter 'sql', which the demo does not have; it
    now asks the server (`adapter_command: list`) and uses an adapter of its adapter_dir, or none."""
    url, routes = stand_in
    listing = {"device": [], "disk": ["emoji", "json", "pirate"], "host": [], "loading": []}
    routes["/v2/models/lora_llm/generate"] = (200, json.dumps({"text_output": json.dumps(listing)}).encode())
    assert probes.served_adapters(url, "lora_llm", timeout=2) == ["emoji", "json", "pirate"]
    server = SimpleNamespace(url=url, grpc_url="127.0.0.1:1", metrics_url=url + "/metrics", startup_seconds=1.0,
                             install=SimpleNamespace(binary="tritonserver"))

    def example(adapters):
        """The example's request body, as the banner prints it."""
        text = banner(server, None, adapters)
        return json.loads(text.split(" -d '", 1)[1].split("'", 1)[0])

    assert example(["emoji", "json", "pirate"])["parameters"]["adapter_id"] == "emoji"
    assert "adapter_id" not in example([])["parameters"]
    routes["/v2/models/lora_llm/generate"] = (400, json.dumps({"error": "'list' is disabled"}).encode())
    assert probes.served_adapters(url, "lora_llm", timeout=2) == []
    assert probes.served_adapters("http://127.0.0.1:9", "lora_llm", timeout=2) == []
