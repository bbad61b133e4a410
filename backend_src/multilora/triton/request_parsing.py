"""Turn one Triton request (input tensors + request parameters) into a GenerationRequest.

Pure functions over numpy arrays and dicts, so every rule here is unit-tested without a server.
The fields and their kinds come from `fields.FIELDS`. Each may come as an input tensor, as a
request parameter (what `/generate` sends), or, for sampling and request fields, inside
`sampling_parameters` (a JSON object, as Triton's vLLM backend takes it); a tensor wins over a
parameter, which wins over `sampling_parameters`. Values arrive as Python numbers of full
precision (integer inputs are INT64), and every range is judged by SamplingParams, by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..adapters.ids import check_adapter_id
from ..engine.response_format import MAX_FORMAT_BYTES, ResponseFormat
from ..engine.sampling_params import LIMITS, SamplingParams
from ..engine.sequence import GenerationRequest
from ..errors import InvalidParameterError
from .fields import BY_NAME, COMMAND, INPUT_NAMES, REQUEST, SAMPLING, names
from .json_input import MAX_SCHEMA_DEPTH, check_unicode, parse_json
from .messages import parse_messages

__all__ = ["INPUT_NAMES", "ADAPTER_COMMANDS", "AdapterCommand", "parse_adapter_command", "parse_request"]

ADAPTER_COMMANDS = ("list", "load", "unload")
_COMMAND_FIELDS = ("adapter_id",) + names(COMMAND)
_IN_SAMPLING_PARAMETERS = names(SAMPLING, REQUEST)  # the vLLM backend's keys, plus ours
MAX_SAMPLING_PARAMETERS_BYTES = 64 * 1024


@dataclass(frozen=True)
class AdapterCommand:
    """A management request (`adapter_command` = list | load | unload) instead of a generation."""

    command: str
    adapter_id: str | None
    token: str | None = None  # management_token, for the server's policy (triton/management.py)


def parse_adapter_command(tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> AdapterCommand | None:
    """The management command a request carries, or None for an ordinary generation request."""
    values = _gather(tensors, parameters)
    if "adapter_command" not in values:
        return None
    for name in values:
        if name not in _COMMAND_FIELDS:  # never silently ignored (issue 10, item 13)
            raise InvalidParameterError(name, "is not used with adapter_command; allowed: "
                                              f"{', '.join(_COMMAND_FIELDS)}")
    typed = {name: _convert(name, BY_NAME[name].kind, value) for name, value in values.items()}
    command, adapter = typed["adapter_command"], typed.get("adapter_id") or None
    if command not in ADAPTER_COMMANDS:
        raise InvalidParameterError("adapter_command", f"{command!r} is not one of {', '.join(ADAPTER_COMMANDS)}")
    if command == "list" and adapter:
        raise InvalidParameterError("adapter_id", "is not used with adapter_command 'list'")
    if command != "list":
        if not adapter:
            raise InvalidParameterError("adapter_id", f"is required with adapter_command '{command}'")
        check_adapter_id(adapter)
    return AdapterCommand(command, adapter, typed.get("management_token"))


def parse_request(request_id: str, tensors: dict[str, np.ndarray], parameters: dict[str, Any],
                  default_max_tokens: int) -> GenerationRequest:
    values = _gather(tensors, parameters)
    for name in values:
        if name not in BY_NAME:
            raise InvalidParameterError(name, f"unknown parameter; allowed: {', '.join(INPUT_NAMES)}")
        if BY_NAME[name].group == COMMAND:
            raise InvalidParameterError(name, "is only used with adapter_command")
    if "sampling_parameters" in values:
        values = _sampling_json(values.pop("sampling_parameters")) | values
    typed = {name: _convert(name, BY_NAME[name].kind, value) for name, value in values.items()}

    prompt, messages = typed.get("text_input"), typed.get("messages")
    if prompt is not None and messages is not None:
        raise InvalidParameterError("messages", "give either 'text_input' or 'messages', not both")
    if messages is None and not prompt:
        raise InvalidParameterError("text_input", "is required and must be a non-empty string "
                                                  "(or give 'messages', a chat)")
    adapter = typed.get("adapter_id") or typed.get("lora_name") or None
    if adapter:
        check_adapter_id(adapter, "adapter_id" if typed.get("adapter_id") else "lora_name")
    sampling = {k: typed[k] for k in names(SAMPLING) if k in typed}
    sampling.setdefault("max_tokens", default_max_tokens)
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"])
    stream = typed.get("stream", False)
    exclude = _exclude_input(typed.get("exclude_input_in_output"), stream, chat=messages is not None)
    return GenerationRequest(request_id=request_id, prompt=prompt or "", params=SamplingParams(**sampling),
                             adapter_id=adapter, stream=stream, exclude_input_in_output=exclude, messages=messages)


def _exclude_input(asked: bool | None, stream: bool, chat: bool) -> bool:
    """As Triton's vLLM backend: the whole text includes the prompt unless excluded; streams never
    do, and neither does a chat (its prompt is the rendered template, not what the client sent)."""
    if asked is None:
        return stream or chat
    if not asked and (stream or chat):
        why = "stream=true (streamed pieces never repeat the prompt)" if stream else \
            "messages (a chat answer never repeats the rendered prompt)"
        raise InvalidParameterError("exclude_input_in_output", f"false is not allowed with {why}")
    return asked


def _gather(tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, Any]:
    """Raw values by name (unknown names too, for the caller to refuse), a tensor winning over a
    parameter of the same name."""
    values: dict[str, Any] = {}
    for name, value in parameters.items():
        if not name.startswith("triton_"):  # set by Triton's own clients (triton_enable_empty_final_response)
            values[name] = value
    for name, array in tensors.items():
        if name in BY_NAME:
            values[name] = list(array.reshape(-1)) if BY_NAME[name].kind == "strs" else _scalar(name, array)
    return values


def _sampling_json(raw: Any) -> dict[str, Any]:
    text = _text("sampling_parameters", raw)
    if len(text) > MAX_SAMPLING_PARAMETERS_BYTES:
        raise InvalidParameterError("sampling_parameters", f"is longer than {MAX_SAMPLING_PARAMETERS_BYTES} bytes")
    parsed = parse_json("sampling_parameters", text)
    if not isinstance(parsed, dict):
        raise InvalidParameterError("sampling_parameters", "must be a JSON object")
    unknown = sorted(set(parsed) - set(_IN_SAMPLING_PARAMETERS))
    if unknown:
        raise InvalidParameterError("sampling_parameters", f"unknown key(s) {unknown}; allowed: "
                                                           f"{', '.join(_IN_SAMPLING_PARAMETERS)}")
    return parsed


def _response_format(name: str, value: Any) -> ResponseFormat | None:
    """A JSON string (an input or a parameter), or an object inside sampling_parameters."""
    if not isinstance(value, dict):
        text = _text(name, value)
        if len(text) > MAX_FORMAT_BYTES:
            raise InvalidParameterError(name, f"is longer than {MAX_FORMAT_BYTES} bytes")
        value = parse_json(name, text, MAX_SCHEMA_DEPTH)
    return ResponseFormat.parse(value)


def _scalar(name: str, array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.size != 1:
        raise InvalidParameterError(name, f"must hold exactly one value, got {flat.size}")
    return flat[0]


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _convert(name: str, kind: str, value: Any) -> Any:
    """The Python value of one field, or an error naming it; ranges are SamplingParams' to judge."""
    if isinstance(value, np.float32):
        # The shortest decimal that is this float32: what the client wrote. FP32 stores 0.01 as
        # 0.0099999998, which the documented inclusive minimum of repetition_penalty refused.
        value = float(str(value))
    elif isinstance(value, np.generic):
        value = value.item()  # full precision: numpy int64 / uint64 -> int
    if kind == "str":
        return _text(name, value)
    if kind == "strs":
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_text(name, v) for v in items]
    if kind == "messages":
        return parse_messages(_text(name, value))
    if kind == "format":
        return _response_format(name, value)
    if isinstance(value, (bytes, bytearray)):
        value = _text(name, value)
    try:
        if kind == "bool":
            return _bool(value)
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            value = int(value.strip()) if kind == "int" else float(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (ValueError, TypeError, OverflowError):  # ValueError also: int() of more than 4300 digits
        allowed = LIMITS[name].describe() if name in LIMITS else _KINDS[kind]
        raise InvalidParameterError(name, f"must be {allowed}, got {_shown(value)}") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def _bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameterError(name, "is not valid UTF-8") from None
    if isinstance(value, str):
        return check_unicode(name, value)
    raise InvalidParameterError(name, f"must be a string, got {type(value).__name__}")
