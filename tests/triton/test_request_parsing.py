import json

import numpy as np
import pytest

from multilora.engine.response_format import ResponseFormat
from multilora.errors import InvalidParameterError
from multilora.triton.request_parsing import AdapterCommand, parse_adapter_command, parse_request


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
    assert ((from_tensors.adapter_id, from_tensors.stream) == (from_params.adapter_id, from_params.stream)
            == ("sql", True))
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
                    {"max_tokens": 4, "temperature": 0.2,
                     "sampling_parameters": '{"max_tokens": 5, "temperature": 0.9}'})
    assert request.params.max_tokens == 3 and request.params.temperature == pytest.approx(0.2)


def test_stop_as_a_string_tensor_list():
    request = parse({"text_input": b("hi"), "stop": np.array([[b"a", b"bc"]], dtype=np.object_)})
    assert request.params.stop == ("a", "bc")


@pytest.mark.parametrize("parameters, field, needle", [
    ({"max_tokens": 0}, "max_tokens", "an integer in [1, 1000000], got 0"),
    ({"max_tokens": 2.5}, "max_tokens", "an integer in [1, 1000000], got 2.5"),
    ({"max_tokens": "abc"}, "max_tokens", "an integer in [1, 1000000], got 'abc'"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_k": -3}, "top_k", "an integer in [-1, 1000000] (0 or -1 = off), got -3"),
    ({"temperature": -1}, "temperature", "[0, 100]"),
    ({"temperature": "hot"}, "temperature", "a number in [0, 100] (0 = greedy), got 'hot'"),
    ({"repetition_penalty": 0}, "repetition_penalty", "[0.01, 10]"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty", "[0.01, 10]"),
    ({"seed": -1}, "seed", "an integer in [0, 18446744073709551615], got -1"),
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


def test_integers_are_never_narrowed():
    """Triton delivers INT64 tensors; 2^32 + 4 must be refused, not read as 4 (issue 10, item 6)."""
    with pytest.raises(InvalidParameterError) as tensor:
        parse({"text_input": b("hi"), "max_tokens": np.array([[4294967300]], np.int64)})
    assert str(tensor.value) == "invalid 'max_tokens': must be an integer in [1, 1000000], got 4294967300"
    with pytest.raises(InvalidParameterError, match=r"\[-1, 1000000\].*got 1000000000000$"):
        parse(parameters={"sampling_parameters": json.dumps({"top_k": 10**12})})
    with pytest.raises(InvalidParameterError, match="got 4294967297$"):
        parse({"text_input": b("hi"), "top_k": np.array([[4294967297]], np.int64)})
    assert parse({"text_input": b("hi"), "seed": np.array([[2**64 - 1]], np.uint64)}).params.seed == 2**64 - 1
    assert parse({"text_input": b("hi"), "top_k": np.array([[-1]], np.int64)}).params.top_k == 0


@pytest.mark.parametrize("name, value", [("temperature", np.nan), ("top_p", np.inf), ("temperature", np.inf),
                                         ("repetition_penalty", np.float32(1e-40)), ("top_p", -np.inf)])
def test_values_that_cannot_be_computed_are_refused(name, value):
    with pytest.raises(InvalidParameterError) as err:
        parse({"text_input": b("hi"), name: np.array([[value]], np.float32)})
    assert err.value.field == name and "must be a number in" in str(err.value)


@pytest.mark.parametrize("field, text", [
    ("sampling_parameters", "[" * 1000 + "]" * 1000),  # json.loads raises RecursionError
    ("sampling_parameters", '{"stop": ' + "[" * 100 + '"a"' + "]" * 100 + "}"),  # json.loads copes
    ("messages", "[" * 100_000 + "]" * 100_000),
])
def test_deep_json_is_refused_by_name_not_with_a_recursion_error(field, text):
    with pytest.raises(InvalidParameterError) as err:
        parse_request("id", {field: b(text)}, {}, 16)
    assert str(err.value) == f"invalid '{field}': JSON is nested more than 8 levels deep"


def test_malformed_and_oversized_sampling_parameters():
    with pytest.raises(InvalidParameterError, match="'sampling_parameters': is not valid JSON"):
        parse(parameters={"sampling_parameters": '{"max_tokens": 2'})
    with pytest.raises(InvalidParameterError, match="'sampling_parameters': is longer than 65536 bytes"):
        parse(parameters={"sampling_parameters": json.dumps({"stop": ["x" * 70_000]})})
    with pytest.raises(InvalidParameterError, match="'stop': must be a string, got list"):
        parse(parameters={"sampling_parameters": '{"stop": [["a"]]}'})


def test_management_fields_only_go_with_adapter_command():
    with pytest.raises(InvalidParameterError, match="'management_token': is only used with adapter_command"):
        parse(parameters={"management_token": "secret"})


def test_a_chat_instead_of_a_prompt():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    request = parse({"messages": b(json.dumps(chat))}, {"max_tokens": 3})
    assert request.messages == chat and request.prompt == "" and request.params.max_tokens == 3
    assert request.exclude_input_in_output  # the answer alone, never the rendered template
    assert parse_request("id", {}, {"messages": json.dumps(chat)}, 16).messages == chat  # /generate: a string
    with pytest.raises(InvalidParameterError, match="'messages': give either 'text_input' or 'messages', not both"):
        parse({"text_input": b("hi"), "messages": b(json.dumps(chat))})
    with pytest.raises(InvalidParameterError, match="'exclude_input_in_output': false is not allowed with messages"):
        parse({"messages": b(json.dumps(chat))}, {"exclude_input_in_output": False})
    with pytest.raises(InvalidParameterError, match="'text_input': is required .*'messages'"):
        parse_request("id", {}, {"max_tokens": 3}, 16)


def test_adapter_commands():
    command = parse_adapter_command({}, {"adapter_command": "unload", "adapter_id": "sql", "management_token": "t"})
    assert command == AdapterCommand("unload", "sql", "t")
    assert parse_adapter_command({"adapter_command": b("list")}, {"triton_enable_empty_final_response": True}) == \
        AdapterCommand("list", None)
    assert parse_adapter_command({"text_input": b("hi")}, {"max_tokens": 3}) is None


@pytest.mark.parametrize("tensors, parameters, field, needle", [
    ({}, {"adapter_command": "unload", "adapter_id": "sql", "force": True}, "force",
     "is not used with adapter_command; allowed: adapter_id, adapter_command, management_token"),
    ({"max_tokens": np.array([[3]], np.int64)}, {"adapter_command": "load", "adapter_id": "sql"}, "max_tokens",
     "is not used with adapter_command"),
    ({}, {"adapter_command": "list", "adapter_id": "sql"}, "adapter_id", "is not used with adapter_command 'list'"),
    ({}, {"adapter_command": "delete", "adapter_id": "sql"}, "adapter_command", "not one of list, load, unload"),
    ({}, {"adapter_command": "load"}, "adapter_id", "is required with adapter_command 'load'"),
    ({}, {"adapter_command": "load", "adapter_id": "../x"}, "adapter_id", "not a valid adapter id"),
])
def test_bad_adapter_commands_name_the_field(tensors, parameters, field, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse_adapter_command(tensors, parameters)
    assert err.value.field == field and needle in str(err.value)


def test_logprobs_from_a_tensor_a_parameter_or_sampling_parameters():
    assert parse().params.logprobs is None and parse().params.prompt_logprobs is None  # not asked: not computed
    request = parse({"text_input": b("hi"), "logprobs": np.array([[3]], np.int64)},
                    {"sampling_parameters": '{"prompt_logprobs": 0}'})
    assert (request.params.logprobs, request.params.prompt_logprobs) == (3, 0)
    with pytest.raises(InvalidParameterError, match=r"invalid 'logprobs': must be an integer in \[0, 20\]"):
        parse(parameters={"logprobs": 21})


# -- issue 23 item 6 ---------------------------------------------------------------------------------
LONE = "contains a lone UTF-16 surrogate (\\ud800 at character 1); text must be valid Unicode"


@pytest.mark.parametrize("tensors, parameters, field", [
    ({}, {"messages": json.dumps([{"role": "user", "content": "x\ud800"}])}, "messages"),
    ({"text_input": b("hi")}, {"sampling_parameters": json.dumps({"stop": ["x\ud800"]})}, "sampling_parameters"),
    ({"text_input": b("hi")}, {"sampling_parameters": '{"x\\ud800": 1}'}, "sampling_parameters"),  # a key
    ({}, {"text_input": "x\ud800"}, "text_input"),  # a request parameter Triton hands over as text
    ({"text_input": b("hi")}, {"adapter_id": "x\ud800"}, "adapter_id"),
])
def test_lone_surrogates_are_refused_by_name_before_the_tokenizer(tensors, parameters, field):
    with pytest.raises(InvalidParameterError) as err:
        parse_request("id", tensors, parameters, 16)
    assert str(err.value).startswith(f"invalid '{field}': {LONE}")


def test_surrogate_pairs_are_text():
    request = parse({"messages": b(json.dumps([{"role": "user", "content": "\U0001F600"}]))})  # "\ud83d\ude00"
    assert request.messages == [{"role": "user", "content": "\U0001F600"}]


def test_integers_too_long_to_read_are_refused_by_name():
    with pytest.raises(InvalidParameterError) as err:
        parse(parameters={"sampling_parameters": '{"max_tokens": ' + "1" * 5001 + "}"})
    assert str(err.value) == ("invalid 'sampling_parameters': holds an integer of more than 4300 digits; no field "
                              "takes one that large")
    with pytest.raises(InvalidParameterError) as err:
        parse(parameters={"max_tokens": "1" * 5001})
    too_long = f"'{'1' * 29}... (5003 characters)"
    assert str(err.value) == f"invalid 'max_tokens': must be an integer in [1, 1000000], got {too_long}"


def test_fp32_values_are_read_as_the_decimal_the_client_wrote():
    """0.01, the documented inclusive minimum of repetition_penalty, is 0.0099999998 in FP32."""
    request = parse({"text_input": b("hi"), "repetition_penalty": np.array([[0.01]], np.float32),
                     "temperature": np.array([[0.7]], np.float32)})
    assert (request.params.repetition_penalty, request.params.temperature) == (0.01, 0.7)
    with pytest.raises(InvalidParameterError, match=r"got 0\.0099$"):
        parse({"text_input": b("hi"), "repetition_penalty": np.array([[0.0099]], np.float32)})
def test_response_format_from_a_tensor_a_parameter_or_sampling_parameters():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    expected = ResponseFormat.parse(spec)
    assert parse().params.response_format is None
    assert parse({"text_input": b("hi"), "response_format": b(json.dumps(spec))}).params.response_format == expected
    assert parse(parameters={"response_format": json.dumps(spec)}).params.response_format == expected
    # inside sampling_parameters: an object (or its JSON text)
    assert parse(parameters={"sampling_parameters": json.dumps({"response_format": spec})}).params.response_format \
        == expected
    assert parse(parameters={"response_format": '{"type": "text"}'}).params.response_format is None
    regex = parse(parameters={"response_format": '{"type": "regex", "value": "[0-9]+"}'}).params.response_format
    assert regex == ResponseFormat("regex", "[0-9]+")


def test_a_schema_nests_deeper_than_other_json_fields():
    nested = {"type": "integer"}
    for _ in range(12):  # 26 levels of JSON in all: a JSON schema nests two per level of output
        nested = {"type": "object", "properties": {"x": nested}}
    spec = json.dumps({"type": "json_schema", "json_schema": {"schema": nested}})
    assert parse(parameters={"response_format": spec}).params.response_format.kind == "json_schema"
    with pytest.raises(InvalidParameterError, match="'response_format': JSON is nested more than 64 levels deep"):
        parse(parameters={"response_format": "[" * 100 + "]" * 100})


@pytest.mark.parametrize("value, needle", [
    ("{", "'response_format': is not valid JSON"),
    ('"json"', "'response_format': must be a JSON object"),
    ('{"type": "json"}', "'type' must be one of text, json_object, json_schema, regex, got 'json'"),
    ('{"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}', "the JSON schema is invalid at /type"),
    ('{"type": "regex", "value": "' + "a" * 70_000 + '"}', "'response_format': is longer than 65536 bytes"),
])
def test_bad_response_formats_name_the_field(value, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse(parameters={"response_format": value})
    assert err.value.field == "response_format" and needle in str(err.value)
