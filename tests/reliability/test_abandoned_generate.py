"""Issue 10 item 8: a non-streaming `/generate` whose client went away is not cancelled by Triton
2.51's HTTP front end; `request_timeout_s` bounds the work it can cost."""
from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def metric(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name):
                return float(line.split()[-1])
    return float("nan")


def running_rows(metrics_url: str) -> float:
    return metric(metrics_url, 'lora_scheduler_state{state="running"}')


def test_generate_abandoned_by_its_clients_stops_at_request_timeout_s(server, wait_until):
    """The server's request_timeout_s is 3 s (reliability/conftest.py)."""
    body = json.dumps({"text_input": "Hello", "parameters": {"max_tokens": 2000, "ignore_eos": True}})
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(4):  # four clients send a long generation and hang up
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST /v2/models/lora_llm/generate HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            time.sleep(0.1)
    wait_until(lambda: running_rows(server.metrics_url) == 4, 30, "the abandoned requests run", step=0.2)
    stopped = wait_until(lambda: running_rows(server.metrics_url) == 0, 30, "the abandoned requests end",
                         step=0.2)
    assert stopped < 10, f"the abandoned requests ran {stopped:.1f} s more"
    generated = metric(server.metrics_url, 'lora_generated_tokens_total{adapter="__base__"}')
    assert generated < 4 * 2000, "they ran to the end"
