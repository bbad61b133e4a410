"""The gateway's error statuses, its lora_llm tensors, the base model's name and its command line."""
from __future__ import annotations

import json

import pytest
import tritonclient.grpc.aio as grpcaio

from multilora_client.errors import RequestTimeoutError, map_error
from multilora_client.gateway.__main__ import parse_args
from multilora_client.gateway.errors import from_backend
from multilora_client.gateway.openai_api import PARAMS as OPENAI_PARAMS
from multilora_client.gateway.tgi_api import PARAMS as TGI_PARAMS
from multilora_client.gateway.triton import Triton, TritonCall, served_name


@pytest.mark.parametrize("message, status, param, code", [
    ("unknown adapter 'nope': no nope/adapter_config.json in adapter_dir", 404, "model", "model_not_found"),
    ("invalid 'adapter_id': '../x' is not a valid adapter id", 404, "model", "model_not_found"),
    ("invalid 'adapter_id': adapter 'x' is not in this server's adapter_allowlist", 404, "model", "model_not_found"),
    ("invalid 'top_p': must be in (0, 1], got 1.5", 400, "top_p", "invalid_parameter"),
    ("invalid 'text_input': is required", 400, "prompt", "invalid_parameter"),
    ("invalid 'response_format': the JSON schema is invalid at /type: 'foo' is not valid", 400, "response_format",
     "invalid_parameter"),
    ("the prompt has 9000 tokens and max_tokens is 16; together they must be at most max_model_len (8192)", 400,
     "max_tokens", "invalid_parameter"),
    ("invalid 'text_input': the prompt has 9000 tokens and max_tokens is 16; together they must be at most "
     "max_model_len (8192)", 400, "prompt", "invalid_parameter"),
    ("invalid 'messages': the prompt has 9000 tokens and max_tokens is 16; together they must be at most "
     "max_model_len (8192)", 400, "messages", "invalid_parameter"),
    ("invalid 'max_tokens': the prompt has 90 tokens and max_tokens is 9000; together they must be at most "
     "max_model_len (8192)", 400, "max_tokens", "invalid_parameter"),
    ("adapter 'broken' cannot be loaded: lora_A is (8, 96)", 500, "model", "adapter_load_failed"),
    ("failed to connect to all addresses", 503, None, "service_unavailable"),
    ("deadline exceeded", 504, None, "timeout"),
    ("something else broke", 500, None, "internal_error"),
])
def test_lora_llm_errors_become_http_statuses(message, status, param, code):
    error = from_backend(map_error(message), OPENAI_PARAMS, model="nope")
    assert (error.status, error.param, error.code) == (status, param, code)
    assert message in error.message
    if status == 404:
        assert error.message.startswith("The model 'nope' does not exist")


def test_the_clients_own_timeout_is_a_504():
    error = RequestTimeoutError("no response from localhost:8001 within 0.1 s")
    assert from_backend(error, OPENAI_PARAMS).status == 504


def test_tgi_names_its_own_fields():
    assert from_backend(map_error("invalid 'max_tokens': must be >= 1"), TGI_PARAMS).param == "max_new_tokens"
    assert from_backend(map_error("invalid 'text_input': the prompt has 9000 tokens ..."), TGI_PARAMS).param == "inputs"
    assert from_backend(map_error("unknown adapter 'x': nope"), TGI_PARAMS).param == "adapter_id"
    assert from_backend(map_error("invalid 'response_format': bad"), TGI_PARAMS).param == "grammar"


def tensors(call: TritonCall) -> dict:
    return {name: array.reshape(-1).tolist() for name, _, array in call.tensors()}


def test_prompt_and_chat_tensors_never_echo_the_prompt():
    prompt = tensors(TritonCall(prompt="SELECT", adapter_id="sql", stream=True,
                                sampling={"max_tokens": 4, "stop": ["a"]}))
    assert prompt == {"text_input": [b"SELECT"], "adapter_id": [b"sql"], "stream": [True], "max_tokens": [4],
                      "stop": [b"a"], "exclude_input_in_output": [True]}
    messages = [{"role": "user", "content": "Grüße"}]
    chat = tensors(TritonCall(messages=messages, sampling={"temperature": 0.5}))
    assert "text_input" not in chat and json.loads(chat["messages"][0]) == messages
    assert chat["temperature"] == [0.5] and chat["exclude_input_in_output"] == [True]


@pytest.mark.parametrize("base_model, name", [
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("demo/base", "demo/base"),
    ("/models/Llama-3.1-8B-Instruct/", "Llama-3.1-8B-Instruct"),
])
def test_the_base_models_served_name(base_model, name):
    assert served_name(base_model) == name


def test_command_line_as_the_launcher_starts_it():
    args = parse_args(["--triton-grpc", "127.0.0.1:8001", "--host", "127.0.0.1", "--port", "9000", "--model", "m"])
    assert (args.triton_grpc, args.host, args.port, args.model) == ("127.0.0.1:8001", "127.0.0.1", 9000, "m")
    assert args.base_model_name is None and args.default_max_tokens == 256


def test_the_gateways_grpc_channel_retries_a_restarted_triton_every_second(monkeypatch):
    """gRPC's reconnect backoff grows to 120 s while Triton restarts: measured, a channel polled
    through a 40 s outage connected 6 s after the server was back; capped at 1 s, at once."""
    made = []
    monkeypatch.setattr(grpcaio, "InferenceServerClient", lambda *args, **kwargs: made.append(kwargs))
    Triton("127.0.0.1:1", "lora_llm", 1.0).client._grpc_client()
    options = dict(made[0]["channel_args"])
    assert options["grpc.max_reconnect_backoff_ms"] == 1000 and options["grpc.initial_reconnect_backoff_ms"] == 1000
    assert options["grpc.max_receive_message_length"] == grpcaio.MAX_GRPC_MESSAGE_SIZE, "tritonclient's size kept"
