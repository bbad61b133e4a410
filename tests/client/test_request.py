"""Argument building: names and types checked locally, tensors and HTTP bodies shaped per protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from multilora_client.endpoint import parse_endpoint
from multilora_client.errors import InvalidParameterError
from multilora_client.request import SAMPLING_FIELDS, adapter_command_parameters, build_request, command_tensors


def config_inputs() -> dict[str, str]:
    """name -> datatype of the model's inputs, read from the repository's config.pbtxt."""
    from pathlib import Path
    import re

    text = (Path(__file__).resolve().parents[2] / "model_repository" / "lora_llm" / "config.pbtxt").read_text()
    return {m[0]: m[1].replace("TYPE_", "").replace("STRING", "BYTES")
            for m in re.findall(r'name: "(\w+)" data_type: (TYPE_\w+)', text)}


def test_sampling_fields_match_the_model_config():
    inputs = config_inputs()
    for name, dtype in SAMPLING_FIELDS.items():
        assert inputs[name] == dtype, name


def test_tensors_are_batch_of_one_with_the_right_dtypes():
    request = build_request("hi", "sql", stream=True, max_tokens=8, temperature=0.5, top_p=0.9, top_k=40,
                            seed=2**63 + 5, repetition_penalty=1.1, stop=["\n", "END"], ignore_eos=True)
    tensors = {name: (dtype, array) for name, dtype, array in request.tensors()}
    assert tensors["text_input"][1].tolist() == [[b"hi"]]
    assert tensors["adapter_id"][1].tolist() == [[b"sql"]]
    assert tensors["stream"][1].dtype == np.bool_ and tensors["stream"][1].tolist() == [[True]]
    assert tensors["max_tokens"][1].dtype == np.int32
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
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": []}, "stop"),
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


def test_adapter_command_parameters():
    assert adapter_command_parameters("list") == {"adapter_command": "list"}
    assert adapter_command_parameters("load", "sql") == {"adapter_command": "load", "adapter_id": "sql"}
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
