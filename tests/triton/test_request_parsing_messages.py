"""The `messages` field of a request (issue 13): as a tensor or a /generate parameter, never with text_input."""
import json

import numpy as np
import pytest

from multilora.errors import InvalidParameterError
from multilora.triton.request_parsing import parse_request

MESSAGES = [{"role": "user", "content": "Hi"}]


def b(text: str) -> np.ndarray:
    return np.array([[text.encode()]], dtype=np.object_)


def parse(tensors, parameters=None):
    return parse_request("id", tensors, parameters or {}, default_max_tokens=16)


def test_messages_as_a_tensor_or_a_parameter():
    from_tensor = parse({"messages": b(json.dumps(MESSAGES)), "adapter_id": b("sql")})
    from_parameter = parse({}, {"messages": json.dumps(MESSAGES), "stream": True})
    assert from_tensor.messages == from_parameter.messages == MESSAGES
    assert from_tensor.prompt == "" and from_tensor.adapter_id == "sql" and from_parameter.stream


def test_text_input_requests_have_no_messages():
    assert parse({"text_input": b("hi")}).messages is None


@pytest.mark.parametrize("tensors, message", [
    ({"messages": b(json.dumps(MESSAGES)), "text_input": b("hi")}, "'messages': give either text_input or messages"),
    ({}, "'text_input': is required (or messages)"),
    ({"messages": b("[{")}, "'messages': must be a JSON list"),
    ({"messages": b('[{"role": "robot", "content": "x"}]')}, "has role 'robot'"),
])
def test_bad_messages_requests(tensors, message):
    with pytest.raises(InvalidParameterError) as info:
        parse(tensors)
    assert message in str(info.value)
