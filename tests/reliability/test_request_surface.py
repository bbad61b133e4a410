"""The request surface against the real tritonserver (issue 10, items 2 (6), 3 (7), 4 (13) and 5 (10)).

Large integers are refused by name instead of wrapping, bad values and too-deep JSON are refused by
name instead of as internal errors, what Triton's HTTP front end answers before our model runs is
what docs/api.md says it is, adapter commands refuse what they do not use, and load / unload need
the management token. The server (reliability/conftest.py) requires a management token.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from multilora_client import Client, InvalidParameterError
from serving_kit import TOKEN

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def post(server, body: dict | bytes, endpoint: str = "generate") -> tuple[int, dict | str]:
    """Status and JSON answer (the raw text for generate_stream's events)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server.url}/v2/models/lora_llm/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return status, text if endpoint == "generate_stream" and status == 200 else json.loads(text)


def generate(server, **parameters) -> tuple[int, dict]:
    return post(server, {"text_input": "Hello", "parameters": {"max_tokens": 2} | parameters})


def documented_errors() -> str:
    """The "Errors" section of docs/api.md."""
    return (REPO / "docs" / "api.md").read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]


# -- item 6: integers are never narrowed ------------------------------------------------------------
@pytest.mark.parametrize("name, value", [("max_tokens", 4294967300), ("top_k", 4294967297), ("top_k", 10**12)])
def test_large_integers_are_refused_naming_the_limit(server, name, value):
    status, body = generate(server, **{name: value})
    limit = "[1, 1000000]" if name == "max_tokens" else "[-1, 1000000] (0 or -1 = off)"
    assert (status, body) == (400, {"error": f"invalid '{name}': must be an integer in {limit}, got {value}"})


def test_large_integers_over_grpc_and_at_the_top_level_of_the_body(server):
    status, body = post(server, {"text_input": "Hello", "max_tokens": 4294967300})
    assert status == 400 and body["error"].endswith("got 4294967300")
    with pytest.raises(InvalidParameterError) as err:
        Client(server.grpc_url).generate("Hello", max_tokens=4294967300)
    assert err.value.message == "invalid 'max_tokens': must be an integer in [1, 1000000], got 4294967300"


# -- item 7: what our code sees is refused by name; what Triton answers first is documented -----------
@pytest.mark.parametrize("parameters, error", [
    ({"sampling_parameters": "[" * 1000 + "]" * 1000},
     "invalid 'sampling_parameters': JSON is nested more than 8 levels deep"),
    ({"sampling_parameters": '{"top_k": "abc"}'},
     "invalid 'top_k': must be an integer in [-1, 1000000] (0 or -1 = off), got 'abc'"),
    ({"sampling_parameters": '{"repetition_penalty": 1e-40}'},
     "invalid 'repetition_penalty': must be a number in [0.01, 10] (1 = off), got 1e-40"),
    ({"bogus": 1.5}, "invalid 'bogus': unknown parameter; allowed: text_input, messages, adapter_id, lora_name, "
                     "max_tokens, stream, temperature, top_p, top_k, seed, repetition_penalty, stop, ignore_eos, "
                     "logprobs, prompt_logprobs, n, response_format, exclude_input_in_output, sampling_parameters, "
                     "adapter_command, management_token"),
])
def test_values_our_parser_sees_are_refused_by_name(server, parameters, error):
    assert generate(server, **parameters) == (400, {"error": error})


@pytest.mark.parametrize("name, value", [("temperature", float("nan")), ("top_p", float("inf"))])
def test_float_tensors_that_cannot_be_computed_are_refused_by_name(server, name, value):
    """FP32 tensors (gRPC) can carry NaN and infinity, which JSON cannot."""
    with pytest.raises(InvalidParameterError) as err:
        Client(server.grpc_url).generate("Hello", max_tokens=2, **{name: value})
    assert err.value.field == name and err.value.message.endswith(f"got {value!r}")
    assert "must be a number in" in err.value.message


@pytest.mark.parametrize("body", [
    {"text_input": "Hello", "parameters": {"max_tokens": "abc"}},
    {"text_input": "Hello", "parameters": {"max_tokens": 2.5}},
    {"text_input": "Hello", "parameters": {"temperature": "hot"}},
    {"text_input": "Hello", "parameters": {"seed": -1}},
    {"text_input": "Hello", "parameters": {"stream": "yes"}},
    {"text_input": "Hello", "parameters": {"adapter_id": 5}},
    {"text_input": "Hello", "parameters": {"sampling_parameters": {"max_tokens": 2}}},
    {"text_input": "Hello", "parameters": {"bogus": [1, 2]}},
    b'{"text_input": "Hi", "parameters": {"max_tokens": 2',  # cut short
])
def test_what_tritons_front_end_answers_before_our_code_is_in_the_api_docs(server, body):
    status, answer = post(server, body)
    assert status in (400, 500) and answer["error"]
    assert f"| {status} | `{answer['error']}`" in documented_errors()


# -- item 13: stream on /generate, unknown command parameters ---------------------------------------
def test_stream_true_on_generate_is_answered_as_the_api_docs_say(server):
    status, body = generate(server, stream=True)
    assert status == 200 and body == {"error": "generate expects model to produce exactly 1 response, use generate "
                                               "stream for model that generates various number of responses"}
    assert f"| {status} | `{body['error']}`" in documented_errors()
    status, events = post(server, {"text_input": "Hello", "parameters": {"max_tokens": 2, "stream": True}},
                          "generate_stream")
    assert status == 200 and '"finish_reason":"length"' in events  # where stream=true belongs


def test_adapter_command_refuses_parameters_it_does_not_use(server):
    status, body = post(server, {"parameters": {"adapter_command": "list", "force": True}})
    assert (status, body) == (400, {"error": "invalid 'force': is not used with adapter_command; allowed: "
                                             "adapter_id, adapter_command, management_token"})
    status, body = post(server, {"parameters": {"adapter_command": "list", "adapter_id": "sql"}})
    assert (status, body) == (400, {"error": "invalid 'adapter_id': is not used with adapter_command 'list'"})


# -- item 10: management needs the token for load and unload ----------------------------------------
def test_list_is_open_and_load_unload_need_the_token(server):
    status, body = post(server, {"parameters": {"adapter_command": "list"}})
    assert status == 200 and "sql" in json.loads(body["text_output"])["disk"]
    for token, reason in [(None, "missing"), ("s3cret-toke", "wrong")]:
        parameters = {"adapter_command": "unload", "adapter_id": "sql"} | ({"management_token": token} if token else {})
        status, body = post(server, {"parameters": parameters})
        assert (status, body) == (400, {"error": f"invalid 'management_token': {reason}: this server requires its "
                                                 "management token for adapter_command 'unload'"})
    for command, answer in [("load", "loaded"), ("unload", "unloaded")]:
        status, body = post(server, {"parameters": {"adapter_command": command, "adapter_id": "summarize",
                                                    "management_token": TOKEN}})
        assert status == 200 and json.loads(body["text_output"])[answer] is True


def test_the_client_sends_its_management_token(server):
    with pytest.raises(InvalidParameterError) as err:
        Client(server.grpc_url).load_adapter("chat")
    assert err.value.field == "management_token"
    assert Client(server.grpc_url, management_token=TOKEN).load_adapter("chat")["loaded"]
    assert "chat" in Client(server.grpc_url).adapters().host  # list needs no token


# -- issue 23 item 6: lone surrogates, huge integers, the documented minimum, the prompt's length -----
LONE = "contains a lone UTF-16 surrogate (\\ud800 at character 0); text must be valid Unicode"


@pytest.mark.parametrize("parameters, field", [
    ({"messages": json.dumps([{"role": "user", "content": "\ud800x"}])}, "messages"),
    ({"text_input": "Hello", "sampling_parameters": json.dumps({"stop": ["\ud800x"]})}, "sampling_parameters"),
])
def test_lone_surrogates_inside_json_fields_are_refused_by_name(server, parameters, field):
    """They used to reach the tokenizer: internal error (TypeError: TextEncodeInput must be ...)."""
    status, body = post(server, {"parameters": {"max_tokens": 2} | parameters})
    assert status == 400 and body["error"].startswith(f"invalid '{field}': {LONE}"), body


def test_a_lone_surrogate_in_text_input_never_reaches_the_tokenizer(server):
    """Triton's own JSON parser refuses a lone high surrogate (a 500, in docs/api.md; the gateway
    answers 400 first); a lone low one reaches our parser as bytes that are not UTF-8."""
    status, body = post(server, {"text_input": "\ud800x", "parameters": {"max_tokens": 2}})
    assert f"| {status} | `{body['error']}`" in documented_errors(), body
    status, body = post(server, {"text_input": "\udc00x", "parameters": {"max_tokens": 2}})
    assert (status, body) == (400, {"error": "invalid 'text_input': is not valid UTF-8"})


def test_an_integer_too_long_to_read_in_sampling_parameters_is_refused_by_name(server):
    status, body = generate(server, sampling_parameters='{"max_tokens": ' + "1" * 5001 + "}")
    assert (status, body) == (400, {"error": "invalid 'sampling_parameters': holds an integer of more than 4300 "
                                             "digits; no field takes one that large"})


def test_the_documented_minimum_repetition_penalty_is_accepted_over_http_and_grpc(server):
    status, body = generate(server, repetition_penalty=0.01)  # FP32: 0.0099999998
    assert status == 200 and body["completion_tokens"] == 2, body
    assert Client(server.grpc_url).generate("Hello", max_tokens=2, repetition_penalty=0.01).completion_tokens == 2
    status, body = generate(server, repetition_penalty=0.0099)
    assert (status, body) == (400, {"error": "invalid 'repetition_penalty': must be a number in [0.01, 10] "
                                             "(1 = off), got 0.0099"})


def test_a_prompt_too_long_by_itself_is_blamed_on_the_prompt(server):
    """The engine's message names the field the client must change: the prompt when it alone leaves no
    room for a new token, max_tokens when fewer new tokens would fit."""
    status, body = post(server, {"text_input": "SELECT " * 4000, "parameters": {"max_tokens": 2}})
    assert status == 400 and body["error"].startswith("invalid 'text_input': the prompt has "), body
    assert "together they must be at most max_model_len" in body["error"]
    status, body = generate(server, max_tokens=1_000_000)
    assert status == 400 and body["error"].startswith("invalid 'max_tokens': the prompt has "), body
    with pytest.raises(InvalidParameterError) as err:
        Client(server.grpc_url).generate("SELECT " * 4000, max_tokens=2)
    assert err.value.field == "text_input"
