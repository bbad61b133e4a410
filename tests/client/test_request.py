"""Argument building: names and types checked locally, tensors and HTTP bodies shaped per protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from multilora.triton.fields import FIELDS, REQUEST, SAMPLING, names
from multilora_client.endpoint import parse_endpoint
from multilora_client.errors import InvalidParameterError
from multilora_client.request import (
    SAMPLING_FIELDS,
    adapter_command_parameters,
    build_chat,
    build_request,
    command_tensors,
)


def config_inputs() -> dict[str, str]:
    """name -> datatype of the model's inputs, as the server declares them (multilora.triton.fields;
    tests/triton/test_fields.py holds config.pbtxt to the same)."""
    return {f.name: f.datatype for f in FIELDS}


def test_sampling_fields_are_the_servers():
    """The client package cannot import the server's declaration, so this test holds them together."""
    inputs = config_inputs()
    assert set(SAMPLING_FIELDS) == set(names(SAMPLING)) | {"exclude_input_in_output"}
    assert set(SAMPLING_FIELDS) <= set(names(SAMPLING, REQUEST))
    for name, dtype in SAMPLING_FIELDS.items():
        assert inputs[name] == dtype, name


def test_tensors_are_batch_of_one_with_the_right_dtypes():
    request = build_request("hi", "sql", stream=True, max_tokens=8, temperature=0.5, top_p=0.9, top_k=40,
                            seed=2**63 + 5, repetition_penalty=1.1, stop=["\n", "END"], ignore_eos=True)
    tensors = {name: (dtype, array) for name, dtype, array in request.tensors()}
    assert tensors["text_input"][1].tolist() == [[b"hi"]]
    assert tensors["adapter_id"][1].tolist() == [[b"sql"]]
    assert tensors["stream"][1].dtype == np.bool_ and tensors["stream"][1].tolist() == [[True]]
    assert tensors["max_tokens"][1].dtype == np.int64 and tensors["top_k"][1].dtype == np.int64
    assert tensors["temperature"][1].dtype == np.float32
    assert tensors["seed"][1].dtype == np.uint64 and int(tensors["seed"][1][0, 0]) == 2**63 + 5
    assert tensors["stop"][1].shape == (1, 2) and tensors["stop"][1].tolist() == [[b"\n", b"END"]]
    inputs = config_inputs()
    for name, (dtype, array) in tensors.items():
        assert inputs[name] == dtype and array.shape[0] == 1


def test_unset_arguments_are_left_to_the_server():
    request = build_request("hi", None, max_tokens=None, temperature=None)
    assert [name for name, _, _ in request.tensors()] == ["text_input", "stream"]
    assert request.http_body() == {"text_input": "hi", "parameters": {"stream": False}}


def test_http_body_puts_stop_lists_in_sampling_parameters():
    body = build_request("hi", "chat", stream=True, max_tokens=4, stop="END").http_body()
    params = body["parameters"]
    assert params["adapter_id"] == "chat" and params["max_tokens"] == 4 and params["stream"] is True
    assert json.loads(params["sampling_parameters"]) == {"stop": ["END"]}


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokns": 3}, "max_tokns"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": []}, "stop"),
    ({"response_format": ["json"]}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {1j}}}}, "response_format"),
])
def test_wrong_names_and_types_fail_before_sending(kwargs, field):
    with pytest.raises(InvalidParameterError) as info:
        build_request("hi", **kwargs)
    assert info.value.field == field and f"'{field}'" in str(info.value)


def test_ranges_are_the_servers_business():
    """top_p=1.5 is well typed: the server, the one owner of the rules, rejects it with its message."""
    build_request("hi", top_p=1.5, temperature=-3.0)


def test_prompt_must_be_a_non_empty_string():
    with pytest.raises(InvalidParameterError):
        build_request("")


def test_large_integers_are_sent_whole_for_the_server_to_judge():
    tensors = {name: array for name, _, array in build_request("hi", max_tokens=4294967300).tensors()}
    assert int(tensors["max_tokens"][0, 0]) == 4294967300


def test_a_chat_is_sent_as_messages_json():
    chat = [{"role": "user", "content": "Hi"}]
    request = build_chat(chat, "sql", stream=True, max_tokens=4)
    tensors = {name: (dtype, array) for name, dtype, array in request.tensors()}
    assert "text_input" not in tensors and tensors["messages"][0] == "BYTES"
    assert json.loads(tensors["messages"][1][0, 0]) == chat and int(tensors["max_tokens"][1][0, 0]) == 4
    body = build_chat(chat).http_body()
    assert json.loads(body["messages"]) == chat and "text_input" not in body
    for bad in ([], "hi", [["user", "hi"]], [{"role": "user", "content": object()}]):
        with pytest.raises(InvalidParameterError) as info:
            build_chat(bad)
        assert info.value.field == "messages"


def test_a_response_format_is_sent_as_json_text():
    spec = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
    tensors = {name: (dtype, array) for name, dtype, array in build_request("hi", response_format=spec).tensors()}
    assert tensors["response_format"][0] == "BYTES" and json.loads(tensors["response_format"][1][0, 0]) == spec
    assert json.loads(build_request("hi", response_format=spec).http_body()["parameters"]["response_format"]) == spec
    as_text = build_request("hi", response_format='{"type": "json_object"}').http_body()["parameters"]
    assert as_text["response_format"] == '{"type": "json_object"}'


def test_adapter_command_parameters():
    assert adapter_command_parameters("list") == {"adapter_command": "list"}
    assert adapter_command_parameters("list", token="t") == {"adapter_command": "list"}  # list needs none
    assert adapter_command_parameters("load", "sql") == {"adapter_command": "load", "adapter_id": "sql"}
    assert adapter_command_parameters("unload", "sql", "t") == {"adapter_command": "unload", "adapter_id": "sql",
                                                               "management_token": "t"}
    with pytest.raises(InvalidParameterError, match="needs an adapter id"):
        adapter_command_parameters("unload")
    with pytest.raises(InvalidParameterError, match="adapter_command"):
        adapter_command_parameters("delete", "sql")


def test_command_tensors_are_model_inputs():
    tensors = command_tensors(adapter_command_parameters("load", "acme/translate"))
    assert [(n, d, a.tolist()) for n, d, a in tensors] == [
        ("adapter_command", "BYTES", [[b"load"]]), ("adapter_id", "BYTES", [[b"acme/translate"]])]
    inputs = config_inputs()
    assert all(inputs[name] == dtype for name, dtype, _ in tensors)


@pytest.mark.parametrize("url, protocol, target, ssl", [
    (None, "grpc", "localhost:8001", False),
    (None, "http", "localhost:8000", False),
    ("triton.example:9001", "grpc", "triton.example:9001", False),
    ("http://10.0.0.5:8000", "http", "10.0.0.5:8000", False),
    ("https://llm.example.com", "http", "llm.example.com:8000", True),
    ("grpc://[::1]:8001", "grpc", "[::1]:8001", False),
])
def test_parse_endpoint(url, protocol, target, ssl, monkeypatch):
    monkeypatch.delenv("MULTILORA_URL", raising=False)
    endpoint = parse_endpoint(url, protocol)
    assert (endpoint.target, endpoint.ssl) == (target, ssl)


def test_parse_endpoint_env_and_errors(monkeypatch):
    monkeypatch.setenv("MULTILORA_URL", "example:1234")
    assert parse_endpoint(None, "http").target == "example:1234"
    assert parse_endpoint("h", "http").model_url("generate") == "http://h:8000/v2/models/lora_llm/generate"
    for bad, protocol in [("ftp://x", "grpc"), ("http://x/v2", "http"), ("x", "udp")]:
        with pytest.raises(ValueError):
            parse_endpoint(bad, protocol)
