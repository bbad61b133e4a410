"""Responses to values: chunks, the joined Generation, SSE lines, the stream wrappers."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from multilora_client.errors import InvalidParameterError, MultiLoraError, UnknownAdapterError
from multilora_client.response import (
    Chunk,
    SseChunks,
    chunks_from_grpc,
    chunks_from_json,
    collect,
    http_error_message,
    parse_adapters,
    sse_data,
)
from multilora_client.streams import AsyncTextStream, TextStream


class FakeParam:
    def __init__(self, value: bool) -> None:
        self.bool_param = value


class FakeResult:
    """Just the part of tritonclient.grpc.InferResult that chunks_from_grpc reads."""

    def __init__(self, outputs: dict[str, np.ndarray], final_flag: bool | None) -> None:
        self._outputs = outputs
        params = {} if final_flag is None else {"triton_final_response": FakeParam(final_flag)}
        self._response = type("R", (), {"parameters": params})()

    def as_numpy(self, name):
        return self._outputs.get(name)

    def get_response(self):
        return self._response


def text(value: str) -> np.ndarray:
    return np.array([[value.encode()]], dtype=np.object_)


def test_grpc_chunks_middle_final_and_empty_final():
    (middle,) = chunks_from_grpc(FakeResult({"text_output": text("Hel")}, False))
    assert middle == Chunk("Hel", final=False)
    (last,) = chunks_from_grpc(FakeResult({"text_output": text("lo"), "finish_reason": text("length"),
                                           "prompt_tokens": np.array([[3]], np.int32),
                                           "completion_tokens": np.array([[2]], np.int32)}, True))
    assert last == Chunk("lo", True, "length", 3, 2)
    assert chunks_from_grpc(FakeResult({}, True)) == [Chunk("", final=True)]
    # Without Triton's flag (no enable_empty_final_response) finish_reason still marks the end.
    assert chunks_from_grpc(FakeResult({"text_output": text(""), "finish_reason": text("eos")}, None))[0].final


def test_collect_joins_pieces_and_keeps_the_counts():
    chunks = [Chunk("a", False), Chunk("b", False), Chunk("c", True, "stop", 5, 3)]
    generation = collect(iter(chunks))
    assert (generation.text, generation.finish_reason, generation.prompt_tokens, generation.completion_tokens) == \
        ("abc", "stop", 5, 3)
    with pytest.raises(MultiLoraError, match="before the final response"):
        collect(iter(chunks[:2]))


def test_json_chunks_and_errors():
    assert chunks_from_json({"text_output": "x", "finish_reason": "eos", "prompt_tokens": 1,
                             "completion_tokens": 1}, final=None)[0].final
    with pytest.raises(UnknownAdapterError):
        chunks_from_json({"error": "unknown adapter 'zz': no zz/adapter_config.json in adapter_dir"}, final=None)


def test_sse_and_http_error_bodies():
    assert sse_data(b'data: {"text_output": "hi"}\n') == {"text_output": "hi"}
    assert sse_data(b"\n") is None and sse_data(": comment") is None
    assert (http_error_message(b'{"error": "invalid \'top_p\': must be in (0, 1]"}')
            == "invalid 'top_p': must be in (0, 1]")
    assert http_error_message(b'data: {"error":"unknown adapter \'n\'"}\n\n') == "unknown adapter 'n'"
    assert http_error_message(b"plain text") == "plain text"


def test_parse_adapters():
    listing = parse_adapters('{"disk": ["a", "b"], "host": ["a"], "device": []}')
    assert (listing.disk, listing.host, listing.device) == (["a", "b"], ["a"], [])
    with pytest.raises(MultiLoraError):
        parse_adapters("not json")


def test_text_stream_yields_pieces_then_keeps_the_generation():
    closed = []

    def chunks():
        try:
            yield Chunk("Hel", False)
            yield Chunk("", False)
            yield Chunk("lo", True, "length", 2, 2)
        finally:
            closed.append(True)

    stream = TextStream(chunks())
    assert list(stream) == ["Hel", "lo"]
    assert stream.generation.text == "Hello" and stream.generation.finish_reason == "length"
    assert closed == [True]


def test_text_stream_close_early_runs_the_transport_cleanup():
    closed = []

    def chunks():
        try:
            while True:
                yield Chunk("x", False)
        finally:
            closed.append(True)

    with TextStream(chunks()) as stream:
        assert next(stream) == "x"
    assert closed == [True] and stream.generation is None


def test_async_text_stream():
    async def chunks():
        yield Chunk("a", False)
        yield Chunk("b", True, "eos", 1, 2)

    async def run():
        stream = AsyncTextStream(chunks())
        return [p async for p in stream], stream.generation

    pieces, generation = asyncio.run(run())
    assert pieces == ["a", "b"] and generation.text == "ab" and generation.completion_tokens == 2


def test_errors_inside_a_stream_propagate_typed():
    def chunks():
        yield Chunk("a", False)
        raise InvalidParameterError("invalid 'top_p': ...", field="top_p")

    stream = TextStream(chunks())
    assert next(stream) == "a"
    with pytest.raises(InvalidParameterError):
        next(stream)


def test_logprobs_outputs_become_lists_and_join_over_a_stream():
    first, second = [{"id": 5, "token": " a", "logprob": -0.5}], [{"id": 6, "token": "b", "logprob": -1.0}]
    prompt = [{"id": 1, "token": "<s>", "logprob": None, "top_logprobs": None}]
    (middle,) = chunks_from_grpc(FakeResult({"text_output": text(" a"), "logprobs": text(json.dumps(first)),
                                             "prompt_logprobs": text(json.dumps(prompt))}, False))
    assert (middle.logprobs, middle.prompt_logprobs) == (first, prompt)
    (last,) = chunks_from_json({"text_output": "b", "finish_reason": "length", "logprobs": json.dumps(second)}, True)
    generation = collect(iter([middle, last]))
    assert (generation.text, generation.logprobs, generation.prompt_logprobs) == (" ab", first + second, prompt)
    plain = collect(iter([Chunk("x", True, "eos", 1, 1)]))
    assert plain.logprobs is None and plain.prompt_logprobs is None  # not asked
    with pytest.raises(MultiLoraError, match="logprobs that are not JSON"):
        chunks_from_json({"text_output": "b", "logprobs": "{cut"}, True)


def test_a_response_with_n_choices_is_a_chunk_per_choice_and_a_generation_with_choices():
    tensors = {"text_output": np.array([[b"x", b"yz"]], dtype=np.object_), "index": np.array([[0, 1]], np.int32),
               "finish_reason": np.array([[b"length", b"eos"]], dtype=np.object_),
               "prompt_tokens": np.array([[3, 3]], np.int32), "completion_tokens": np.array([[4, 2]], np.int32)}
    chunks = chunks_from_grpc(FakeResult(tensors, True))
    assert chunks == [Chunk("x", False, "length", 3, 4), Chunk("yz", True, "eos", 3, 2, index=1)]
    over_http = chunks_from_json({"text_output": ["x", "yz"], "index": [0, 1], "finish_reason": ["length", "eos"],
                                  "prompt_tokens": [3, 3], "completion_tokens": [4, 2]}, final=True)
    assert over_http == chunks
    generation = collect(iter(chunks))
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in generation.choices] == \
        [("x", "length", 4), ("yz", "eos", 2)]
    assert (generation.text, generation.completion_tokens) == ("x", 4)  # the first choice's


def test_streamed_choices_end_one_by_one_and_the_request_with_the_last():
    events = [{"text_output": "a", "index": 1}, {"text_output": "b", "index": 0},
              {"text_output": "c", "index": 1, "finish_reason": "eos", "prompt_tokens": 2, "completion_tokens": 2},
              {"text_output": "d", "index": 0, "finish_reason": "length", "prompt_tokens": 2, "completion_tokens": 3}]
    sse = SseChunks(choices=2)
    chunks = [sse.chunk("data: " + json.dumps(e)) for e in events]
    assert [c.final for c in chunks] == [False, False, False, True]  # choice 1's end is not the request's
    generation = collect(iter(chunks))
    assert [(c.text, c.finish_reason) for c in generation.choices] == [("bd", "length"), ("ac", "eos")]
    # Over gRPC, Triton's flag says which response is the last.
    (end,) = chunks_from_grpc(FakeResult({"text_output": text("c"), "index": np.array([[1]], np.int32),
                                          "finish_reason": text("eos")}, False))
    assert not end.final and end.index == 1
