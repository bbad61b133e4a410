"""Adapter management through the model's own API, and the metrics Triton exports for it."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from .test_serving import generate

pytestmark = pytest.mark.e2e


def command(server, name: str, adapter_id: str | None = None) -> tuple[int, dict]:
    parameters = {"adapter_command": name} | ({"adapter_id": adapter_id} if adapter_id else {})
    status, body = generate(server, parameters, prompt=None)
    return status, (json.loads(body["text_output"]) if status == 200 else body)


def test_list_load_unload(server):
    status, listing = command(server, "list")
    assert status == 200
    assert {"sql", "chat", "summarize", "acme/translate"} <= set(listing["disk"])
    assert "escape" not in listing["disk"]  # a symlink out of adapter_dir is not an adapter
    status, loaded = command(server, "load", "acme/translate")
    assert status == 200 and loaded["loaded"] and loaded["ranks"] == [64] and loaded["bytes"] > 0
    assert "acme/translate" in command(server, "list")[1]["host"]
    status, unloaded = command(server, "unload", "acme/translate")
    assert status == 200 and unloaded == {"adapter_id": "acme/translate", "unloaded": True}
    assert "acme/translate" not in command(server, "list")[1]["host"]
    status, body = generate(server, {"adapter_id": "acme/translate", "max_tokens": 2})  # loads again on use
    assert status == 200 and body["completion_tokens"] == 2


def test_management_errors(server):
    status, body = command(server, "load", "mismatch")
    assert status == 400 and "layers.0.q_proj" in body["error"]
    status, body = command(server, "load")
    assert status == 400 and "'adapter_id'" in body["error"] and "required" in body["error"]
    status, body = command(server, "explode")
    assert status == 400 and "'adapter_command'" in body["error"] and "list, load, unload" in body["error"]


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_per_adapter_and_cache_metrics(server):
    before = urllib.request.urlopen(server.metrics_url).read().decode()
    for _ in range(2):
        assert generate(server, {"adapter_id": "sql", "max_tokens": 3, "ignore_eos": True})[0] == 200
    after = urllib.request.urlopen(server.metrics_url).read().decode()
    assert _metric(after, "lora_requests_total", adapter="sql") - \
        _metric(before, "lora_requests_total", adapter="sql") == 2
    assert _metric(after, "lora_generated_tokens_total", adapter="sql") - \
        _metric(before, "lora_generated_tokens_total", adapter="sql") == 6
    assert _metric(after, "lora_adapter_cache_events_total", tier="host", event="hit") > 0
    assert _metric(after, "lora_adapter_cache_events_total", tier="device", event="hit") > 0
    assert re.search(r"^lora_adapter_load_seconds_count\S* [1-9]", after, re.M)
    assert _metric(after, "lora_adapters_resident", tier="host") >= 1


def test_a_cancelled_stream_frees_its_row_and_kv_blocks(server):
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    pieces = []
    client.start_stream(callback=lambda result, error: pieces.append(error or result))
    inputs = []
    for name, value, dtype in [("text_input", b"Hello", "BYTES"), ("max_tokens", np.int64(1500), "INT64"),
                               ("ignore_eos", True, "BOOL"), ("stream", True, "BOOL")]:
        tensor = grpcclient.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_ if dtype == "BYTES" else type(value)))
        inputs.append(tensor)
    client.async_stream_infer("lora_llm", inputs)
    deadline = time.monotonic() + 30
    while len(pieces) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    state = urllib.request.urlopen(server.metrics_url).read().decode()
    assert _metric(state, "lora_scheduler_state", state="running") == 1
    assert _metric(state, "lora_scheduler_state", state="kv_blocks_used") > 0
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = urllib.request.urlopen(server.metrics_url).read().decode()
        if _metric(state, "lora_scheduler_state", state="running") == 0:
            break
        time.sleep(0.05)
    assert _metric(state, "lora_scheduler_state", state="running") == 0
    assert _metric(state, "lora_scheduler_state", state="kv_blocks_used") == 0
    assert len(pieces) < 1500  # it really stopped early
