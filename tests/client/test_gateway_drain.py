"""The gateway's drain (issue 23 item 5): after SIGTERM, running answers go on until the drain
deadline; one still running then ends with an error in its API's shape, never silently."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from multilora.launcher import free_port
from multilora_client.gateway.app import GatewayConfig, create_app
from multilora_client.response import Chunk


class SlowTriton:
    """The app's Triton: a piece of text every 20 ms, `pieces` of them (None: never ending)."""

    def __init__(self, pieces: int | None = None) -> None:
        self.pieces, self.closed = pieces, 0

    async def base_model_name(self) -> str:
        return "base"

    def chunks(self, call):
        async def pieces():
            try:
                sent = 0
                while True:
                    await asyncio.sleep(0.02)
                    sent += 1
                    if sent == self.pieces:
                        yield Chunk("x", True, "length", 1, sent)
                        return
                    yield Chunk("x", False)
            finally:
                self.closed += 1  # AsyncClient cancels the Triton request here
        return pieces()

    async def close(self) -> None:
        pass


@pytest.fixture
def gateway():
    app = create_app(GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}", drain_timeout=0.5))
    with TestClient(app) as client:
        yield app, client


def events_while_draining(app, client, path: str, body: dict, begin_after: int = 3) -> list:
    """The stream's events; the drain begins after `begin_after` of them (as SIGTERM would)."""
    events = []
    with client.stream("POST", path, json=body) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if len(events) == begin_after:
                    app.state.drain.begin()
    return events


OPENAI_STREAM = {"model": "base", "prompt": "x", "stream": True}


def test_a_stream_still_running_at_the_deadline_ends_with_an_error_event(gateway):
    app, client = gateway
    app.state.triton = triton = SlowTriton()
    events = events_while_draining(app, client, "/v1/completions", OPENAI_STREAM)
    assert len(events) > 10, "the stream went on while the gateway drained"
    assert "[DONE]" not in events and events[-1] == {"error": {
        "message": "the gateway is shutting down and its drain time (0.5 s) is over: this answer was cut before "
                   "its end; retry it", "type": "server_error", "param": None, "code": "service_unavailable"}}
    assert triton.closed == 1, "the Triton request was cancelled"


def test_a_tgi_stream_cut_at_the_deadline_ends_with_tgis_error_event(gateway):
    app, client = gateway
    app.state.triton = SlowTriton()
    events = events_while_draining(app, client, "/generate_stream", {"inputs": "x"})
    assert events[-1]["error_type"] == "unhealthy" and "drain time (0.5 s) is over" in events[-1]["error"]


def test_a_stream_that_ends_within_the_drain_time_is_whole(gateway):
    app, client = gateway
    app.state.triton = SlowTriton(pieces=12)  # 0.24 s
    events = events_while_draining(app, client, "/v1/completions", OPENAI_STREAM)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "x" * 12


def test_a_whole_answer_cut_at_the_deadline_is_a_503_with_retry_after(gateway):
    app, client = gateway
    app.state.triton = SlowTriton()
    app.state.drain.begin()
    answer = client.post("/generate", json={"inputs": "x"})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "drain time (0.5 s) is over" in answer.json()["error"]
