"""What a generate call sends, built once and shaped for each transport.

Pure functions, unit-tested without a server. Only names and Python types are checked here (so a
typo fails before any network round trip); ranges (top_p in (0, 1], ...) are the server's to judge,
so there is one source of truth for them and its message reaches the caller unchanged.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from .errors import InvalidParameterError

MODEL_NAME = "lora_llm"
# name -> Triton datatype of the model's input; the server declares them in multilora.triton.fields
# (this package does not import the server's: tests/client/test_request.py compares the two).
SAMPLING_FIELDS: dict[str, str] = {
    "max_tokens": "INT64", "temperature": "FP32", "top_p": "FP32", "top_k": "INT64", "seed": "UINT64",
    "repetition_penalty": "FP32", "stop": "BYTES", "ignore_eos": "BOOL", "exclude_input_in_output": "BOOL",
    "logprobs": "INT64", "prompt_logprobs": "INT64", "n": "INT64", "response_format": "BYTES",
}
_NUMPY = {"INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_}
_INTEGER_RANGES = {"INT64": (-(2**63), 2**63 - 1), "UINT64": (0, 2**64 - 1)}
ADAPTER_COMMANDS = ("list", "load", "unload")


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request, validated; `tensors()` and `http_body()` render it per protocol.
    `prompt` is `text_input`, or for a chat the JSON of its messages, sent as `messages`."""

    prompt: str
    adapter_id: str | None = None
    stream: bool = False
    sampling: Mapping[str, Any] = field(default_factory=dict)
    prompt_field: str = "text_input"  # or "messages"

    def tensors(self) -> list[tuple[str, str, np.ndarray]]:
        """(name, datatype, array) per input; every array is [1, N] (a batch of one request)."""
        out = [(self.prompt_field, "BYTES", _array([self.prompt.encode("utf-8")], "BYTES"))]
        if self.adapter_id:
            out.append(("adapter_id", "BYTES", _array([self.adapter_id.encode("utf-8")], "BYTES")))
        out.append(("stream", "BOOL", _array([self.stream], "BOOL")))
        for name, value in self.sampling.items():
            dtype = SAMPLING_FIELDS[name]
            values = [s.encode("utf-8") for s in value] if name == "stop" else \
                [value.encode("utf-8")] if name == "response_format" else [value]
            out.append((name, dtype, _array(values, dtype)))
        return out

    def http_body(self) -> dict[str, Any]:
        """JSON for POST /v2/models/<m>/generate[_stream]: scalars as request parameters, and
        `stop` (a list, which request parameters cannot hold) inside `sampling_parameters`."""
        parameters: dict[str, Any] = {"stream": self.stream}
        if self.adapter_id:
            parameters["adapter_id"] = self.adapter_id
        for name, value in self.sampling.items():
            if name == "stop":
                parameters["sampling_parameters"] = json.dumps({"stop": list(value)})
            else:
                parameters[name] = value
        return {self.prompt_field: self.prompt, "parameters": parameters}


def build_request(prompt: str, adapter_id: str | None = None, stream: bool = False,
                  **sampling: Any) -> GenerateRequest:
    """A text request; sampling arguments are checked by name and Python type (None: server default)."""
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameterError("invalid 'prompt': must be a non-empty string", field="text_input")
    return GenerateRequest(prompt, _adapter(adapter_id), bool(stream), _sampling(sampling))


def build_chat(messages: Sequence[Mapping[str, Any]], adapter_id: str | None = None, stream: bool = False,
               **sampling: Any) -> GenerateRequest:
    """A chat request: OpenAI-style messages ({"role", "content"}), sent as the `messages` JSON.
    Only the shape is checked here; roles and contents are the server's to judge."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages or \
            not all(isinstance(m, Mapping) for m in messages):
        raise InvalidParameterError('invalid \'messages\': must be a non-empty list of {"role", "content"} dicts',
                                    field="messages")
    try:
        text = json.dumps([dict(m) for m in messages])
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"invalid 'messages': not JSON-serializable ({exc})", field="messages") from None
    return GenerateRequest(text, _adapter(adapter_id), bool(stream), _sampling(sampling), prompt_field="messages")


def _adapter(adapter_id: Any) -> str | None:
    if adapter_id is not None and not isinstance(adapter_id, str):
        raise InvalidParameterError(f"invalid 'adapter_id': must be a string, got {adapter_id!r}", field="adapter_id")
    return adapter_id or None


def _sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Names and Python types of the sampling arguments; None means 'server default'."""
    checked: dict[str, Any] = {}
    for name, value in sampling.items():
        if value is None:
            continue
        if name not in SAMPLING_FIELDS:
            raise InvalidParameterError(f"invalid '{name}': unknown parameter; allowed: {', '.join(SAMPLING_FIELDS)}",
                                        field=name)
        checked[name] = _check_type(name, SAMPLING_FIELDS[name], value)
    return checked


def adapter_command_parameters(command: str, adapter_id: str | None = None,
                               token: str | None = None) -> dict[str, str]:
    """Request parameters of an adapter-management request (sent with no text_input); `token` is
    the server's management token, which load and unload need where the server has one."""
    if command not in ADAPTER_COMMANDS:
        raise InvalidParameterError(f"invalid 'adapter_command': must be one of {', '.join(ADAPTER_COMMANDS)}, "
                                    f"got {command!r}", field="adapter_command")
    parameters = {"adapter_command": command}
    if command != "list":
        if not adapter_id or not isinstance(adapter_id, str):
            raise InvalidParameterError(f"invalid 'adapter_id': '{command}' needs an adapter id", field="adapter_id")
        parameters["adapter_id"] = adapter_id
        if token:
            parameters["management_token"] = token
    return parameters


def command_tensors(parameters: dict[str, str]) -> list[tuple[str, str, np.ndarray]]:
    """The same command as BYTES input tensors: over gRPC, Triton's batcher refuses a request
    with no input at all ("request has 0 inputs"), so parameters alone cannot carry it."""
    return [(name, "BYTES", _array([value.encode("utf-8")], "BYTES")) for name, value in parameters.items()]


def _check_type(name: str, dtype: str, value: Any) -> Any:
    if name == "response_format":  # a dict ({"type": "json_schema", ...}) or its JSON text
        if isinstance(value, Mapping):
            try:
                return json.dumps(dict(value))
            except (TypeError, ValueError) as exc:
                raise InvalidParameterError(f"invalid '{name}': not JSON-serializable ({exc})", field=name) from None
        if not isinstance(value, str):
            raise InvalidParameterError(f"invalid '{name}': must be a dict or its JSON text, got {value!r}", field=name)
        return value
    if dtype == "BYTES":  # stop: one string or a sequence of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, Sequence) or not items or not all(isinstance(s, str) for s in items):
            raise InvalidParameterError(f"invalid '{name}': must be a string or a list of strings, got {value!r}",
                                        field=name)
        return tuple(items)
    if dtype == "BOOL":
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidParameterError(f"invalid '{name}': must be true or false, got {value!r}", field=name)
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        kind = "an integer" if dtype in _INTEGER_RANGES else "a number"
        raise InvalidParameterError(f"invalid '{name}': must be {kind}, got {value!r}", field=name)
    if dtype in _INTEGER_RANGES:
        if not isinstance(value, (int, np.integer)) and not float(value).is_integer():
            raise InvalidParameterError(f"invalid '{name}': must be an integer, got {value!r}", field=name)
        value = int(value)
        low, high = _INTEGER_RANGES[dtype]
        if not low <= value <= high:
            raise InvalidParameterError(f"invalid '{name}': {value} does not fit in {dtype}", field=name)
        return value
    return float(value)


def _array(values: list[Any], dtype: str) -> np.ndarray:
    return np.array([values], dtype=_NUMPY[dtype])  # [1, N]


def grpc_inputs(tensors: list[tuple[str, str, Any]]) -> list[grpcclient.InferInput]:
    """(name, Triton dtype, array) triples as tritonclient gRPC inputs (sync and asyncio alike)."""
    inputs = []
    for name, dtype, array in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
