"""Issue 10 item 12: stopping the server must not wait out Triton's exit timeout for nothing.

Whose bug: tritonserver 2.51's. A gRPC stream whose request Triton's core rejected (an unknown
input, a wrong data type: our model never sees it), then stopped by the client with
`cancel_requests=True`, leaves the model referenced, so at shutdown Triton waits its whole
`--exit-timeout-secs` (30 s by default) for a model it never unloads; a stream that a client
simply keeps open blocks the exit even past that. The launcher's stop therefore kills the server
once nothing has been in flight for a few seconds (lora_llm's `lora_scheduler_state` gauges and
Triton's queue gauge on the metrics port), and lets real work finish first.
"""
from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway_kit import listening
from multilora.launcher import free_ports

pytestmark = pytest.mark.e2e
TRITON_EXIT_TIMEOUT_S = 30  # exit_timeout_secs=None below: tritonserver's default


def rejected_by_triton(grpc_url: str) -> str:
    """One stream, one request Triton refuses before our model (INT32 where INT64 is declared),
    then stop_stream(cancel_requests=True); returns the error the client saw."""
    errors = []
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: errors.append(str(error)))
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hello"]], dtype=np.object_))
    wrong = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    client.async_stream_infer("lora_llm", [text, wrong])
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    client.stop_stream(cancel_requests=True)
    client.close()
    return errors[0] if errors else "(no answer)"


def test_stop_after_a_cancelled_stream_with_a_rejected_request_is_prompt(make_server):
    server = make_server(exit_timeout_secs=None)
    with server:
        assert "expects 'INT64'" in rejected_by_triton(server.grpc_url)
        started = time.monotonic()
    took = time.monotonic() - started
    print(f"\nstop took {took:.1f} s (Triton alone waits its exit timeout, {TRITON_EXIT_TIMEOUT_S} s)")
    assert took < 12, f"stop took {took:.1f} s"


def test_stop_lets_a_running_stream_finish_first(make_server, open_streams, wait_until):
    server = make_server(exit_timeout_secs=None)
    with server:
        [stream] = open_streams(server.grpc_url, 1, max_tokens=300)
        wait_until(lambda: stream.responses, 60, "the stream's first tokens")
        started = time.monotonic()
    took = time.monotonic() - started
    assert (stream.finish_reason, stream.completion_tokens) == ("length", 300), stream
    # The client keeps its stream open, so its connection ends with the server, after the final.
    assert stream.error is None or stream.error_at > stream.final_at
    assert took < TRITON_EXIT_TIMEOUT_S


def test_sigterm_lets_a_gateway_stream_finish_and_triton_outlives_it(lora_repo, tmp_path):
    """Issue 23 item 5: the launcher killed the gateway 5 s after SIGTERM, so OpenAI streams died
    mid-way without an error event. Now the gateway drains for the exit timeout too, and Triton is
    only stopped after it, so a stream running when SIGTERM arrives ends whole."""
    http, grpc, metrics, gateway = free_ports(4)
    env = {**os.environ, "HTTP_ADDRESS": "127.0.0.1", "MULTILORA_STATE_DIR": str(tmp_path / "state")}
    env.pop("GATEWAY_ADDRESS", None)
    with open(tmp_path / "launcher.log", "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "multilora.launcher", "--model-repository", str(lora_repo), "--http-port",
             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--gateway-port", str(gateway),
             "--exit-timeout-secs", "300", "--startup-timeout", "300"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    connection = None
    try:
        deadline = time.monotonic() + 360
        while "Ctrl-C stops the server" not in (tmp_path / "launcher.log").read_text(errors="replace") \
                or not listening(gateway):
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
            time.sleep(0.5)
        connection = http_client.HTTPConnection("127.0.0.1", gateway, timeout=300)
        connection.request("POST", "/v1/completions", json.dumps({
            "model": "demo/base", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200
        events = []
        while len(events) < 5:
            line = answer.readline()
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
        launcher.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for line in answer:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
        drained = time.monotonic() - signalled
        assert events[-1] == b"[DONE]", events[-3:]
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 1000 and json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
        assert launcher.wait(timeout=360) == 0
        print(f"\nthe stream ran {drained:.1f} s after SIGTERM and ended whole (the launcher used to kill the gateway "
              "at 5 s)")
    finally:  # the launcher stops its tritonserver (a session of its own) only when let to
        if connection is not None:
            connection.close()
        launcher.terminate()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
