"""The one error mapping: server/transport messages and statuses to typed exceptions."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from multilora_client.errors import (
    AdapterLoadError,
    InvalidParameterError,
    MultiLoraError,
    RequestTimeoutError,
    ServerNotReadyError,
    UnknownAdapterError,
    from_exception,
    map_error,
)


@pytest.mark.parametrize("message, status, kind", [
    ("unknown adapter 'nope': no nope/adapter_config.json in adapter_dir", None, UnknownAdapterError),
    ("unknown adapter 'x': this server has no adapter_dir", "StatusCode.NOT_FOUND", UnknownAdapterError),
    ("invalid 'top_p': must be in (0, 1], got 1.5", None, InvalidParameterError),
    ("invalid 'max_tokns': unknown parameter; allowed: text_input, ...", "400", InvalidParameterError),
    ("adapter 'mismatch': layers.0.q_proj lora_A is (8, 96), expected (8, 128)", None, AdapterLoadError),
    ("the prompt has 9 tokens and max_tokens is 5000; together they must be at most max_model_len (2048)",
     None, InvalidParameterError),
    ("failed to connect to all addresses; last error: UNKNOWN: Connection refused", "StatusCode.UNAVAILABLE",
     ServerNotReadyError),
    ("Request for unknown model: 'lora_llm' is not found", 404, ServerNotReadyError),
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError),
    ("something the server has never said", "400", InvalidParameterError),
    ("internal error while generating: RuntimeError: boom", None, MultiLoraError),
])
def test_map_error_kinds(message, status, kind):
    error = map_error(message, status)
    assert type(error) is kind
    assert error.message == message and str(error) == message, "the server's text reaches the caller unchanged"


def test_map_error_pulls_out_the_field_and_the_adapter():
    assert map_error("invalid 'top_p': must be in (0, 1], got 1.5").field == "top_p"
    assert map_error("unknown adapter 'acme/translate': no ...").adapter_id == "acme/translate"
    assert map_error("adapter 'truncated': adapter_model.safetensors is unreadable").adapter_id == "truncated"
    assert map_error("the prompt ... max_model_len (2048)").field == "max_tokens"


def test_message_wins_over_status():
    """gRPC stream errors carry no status; HTTP ones say 400 for everything: the text decides."""
    assert type(map_error("unknown adapter 'a': ...", "400")) is UnknownAdapterError
    assert type(map_error("invalid 'seed': must be an integer", "StatusCode.INVALID_ARGUMENT")) is InvalidParameterError


def test_status_is_normalized():
    assert map_error("x", "StatusCode.UNAVAILABLE").status == "UNAVAILABLE"
    assert map_error("x", 503).status == "503"
    assert map_error("x").status is None


def test_all_errors_are_multilora_errors():
    for kind in (UnknownAdapterError, InvalidParameterError, ServerNotReadyError, RequestTimeoutError,
                 AdapterLoadError):
        assert issubclass(kind, MultiLoraError)


def test_from_exception_tritonclient():
    exc = InferenceServerException(msg="invalid 'top_k': must be an integer, got 'a'", status="400")
    error = from_exception(exc)
    assert isinstance(error, InvalidParameterError) and error.field == "top_k" and error.status == "400"


def test_from_exception_grpc_rpc_error():
    class FakeRpcError(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "Socket closed"

    error = from_exception(FakeRpcError())
    assert isinstance(error, ServerNotReadyError) and error.status == "UNAVAILABLE"


@pytest.mark.parametrize("exc, kind", [
    (ConnectionRefusedError(111, "Connection refused"), ServerNotReadyError),
    (TimeoutError("timed out"), RequestTimeoutError),
    (asyncio.TimeoutError(), RequestTimeoutError),
    (ValueError("weird"), MultiLoraError),
])
def test_from_exception_transport_errors(exc, kind):
    assert type(from_exception(exc)) is kind


def test_from_exception_keeps_our_own_errors():
    error = UnknownAdapterError("unknown adapter 'a'")
    assert from_exception(error) is error
