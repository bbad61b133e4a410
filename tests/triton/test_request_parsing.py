import json

import numpy as np
import pytest

from multilora.errors import InvalidParameterError
from multilora.triton.request_parsing import parse_request


def b(text: str) -> np.ndarray:
    return np.array([[text.encode()]], dtype=np.object_)


def parse(tensors=None, parameters=None):
    return parse_request("id", tensors or {"text_input": b("hi")}, parameters or {}, default_max_tokens=16)


def test_tensors_and_parameters_build_the_same_request():
    from_tensors = parse({"text_input": b("hi"), "adapter_id": b("sql"), "max_tokens": np.array([[7]], np.int32),
                          "temperature": np.array([[0.5]], np.float32), "seed": np.array([[3]], np.uint64),
                          "stream": np.array([[True]])})
    from_params = parse(parameters={"adapter_id": "sql", "max_tokens": 7, "temperature": 0.5, "seed": 3,
                                    "stream": True})
    assert from_tensors.params == from_params.params
    assert (from_tensors.adapter_id, from_tensors.stream) == (from_params.adapter_id, from_params.stream) == ("sql", True)
    assert from_params.params.max_tokens == 7 and from_params.params.seed == 3


def test_defaults_greedy_base_model():
    request = parse()
    assert request.adapter_id is None and request.params.temperature == 0 and request.params.max_tokens == 16
    assert not request.stream and not request.exclude_input_in_output  # the vLLM backend's default


def test_streams_exclude_the_prompt_and_cannot_include_it():
    assert parse(parameters={"stream": True}).exclude_input_in_output
    assert parse(parameters={"exclude_input_in_output": True}).exclude_input_in_output
    with pytest.raises(InvalidParameterError, match="'exclude_input_in_output'.*stream=true"):
        parse(parameters={"stream": True, "exclude_input_in_output": False})


def test_sampling_parameters_json_like_the_vllm_backend():
    request = parse(parameters={"sampling_parameters": json.dumps(
        {"lora_name": "chat", "temperature": "0.7", "top_p": "0.9", "top_k": -1, "stop": ["\n\n", "END"]})})
    assert request.adapter_id == "chat"
    assert request.params.temperature == pytest.approx(0.7) and request.params.top_p == pytest.approx(0.9)
    assert request.params.top_k == 0 and request.params.stop == ("\n\n", "END")


def test_a_tensor_wins_over_a_parameter_which_wins_over_sampling_parameters():
    request = parse({"text_input": b("hi"), "max_tokens": np.array([[3]], np.int32)},
                    {"max_tokens": 4, "temperature": 0.2, "sampling_parameters": '{"max_tokens": 5, "temperature": 0.9}'})
    assert request.params.max_tokens == 3 and request.params.temperature == pytest.approx(0.2)


def test_stop_as_a_string_tensor_list():
    request = parse({"text_input": b("hi"), "stop": np.array([[b"a", b"bc"]], dtype=np.object_)})
    assert request.params.stop == ("a", "bc")


@pytest.mark.parametrize("parameters, field, needle", [
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": 2.5}, "max_tokens", "an integer"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_k": -3}, "top_k", ">= 0"),
    ({"temperature": -1}, "temperature", "[0, 100]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "(0, 10]"),
    ({"stream": "maybe"}, "stream", "true or false"),
    ({"adapter_id": "../x"}, "adapter_id", "not a valid adapter id"),
    ({"adapter_id": "a\\b"}, "adapter_id", "not a valid adapter id"),
    ({"adapter_id": "a/b/c"}, "adapter_id", "not a valid adapter id"),
    ({"sampling_parameters": '{"lora_name": "x\\u0000y"}'}, "lora_name", "not a valid adapter id"),
    ({"sampling_parameters": "[1]"}, "sampling_parameters", "JSON object"),
    ({"sampling_parameters": '{"temprature": 1}'}, "sampling_parameters", "temprature"),
    ({"bogus": 1}, "bogus", "unknown parameter"),
])
def test_bad_values_name_the_field_and_what_is_allowed(parameters, field, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse(parameters=parameters)
    assert err.value.field == field
    assert needle in str(err.value) and f"'{field}'" in str(err.value)


def test_missing_prompt_and_bad_utf8():
    with pytest.raises(InvalidParameterError, match="'text_input'.*required"):
        parse_request("id", {}, {"max_tokens": 3}, default_max_tokens=16)
    with pytest.raises(InvalidParameterError, match="'text_input'.*UTF-8"):
        parse({"text_input": np.array([[b"\xff\xfe"]], dtype=np.object_)})


def test_triton_client_parameters_are_ignored():
    assert parse(parameters={"triton_enable_empty_final_response": True}).params.max_tokens == 16
