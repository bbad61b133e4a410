"""Turn one Triton request (input tensors + request parameters) into a GenerationRequest.

Pure functions over numpy arrays and dicts, so every rule here is unit-tested without a server.
Each field may come as an input tensor, as a request parameter (what `/generate` sends), or inside
`sampling_parameters` (a JSON object, as Triton's vLLM backend takes it); a tensor wins over a
parameter, which wins over `sampling_parameters`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from ..engine.chat_template import parse_messages
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import GenerationRequest
from ..lora.adapter_ids import check_adapter_id

# name -> kind; the request surface, in one place (config.pbtxt declares the same inputs).
FIELDS: dict[str, str] = {
    "text_input": "str", "adapter_id": "str", "lora_name": "str", "max_tokens": "int", "stream": "bool",
    "temperature": "float", "top_p": "float", "top_k": "int", "seed": "int", "repetition_penalty": "float",
    "stop": "strs", "ignore_eos": "bool", "exclude_input_in_output": "bool",
    "messages": "str",  # chat (issue 13): a JSON list of {role, content}; interim until the request-field branch
}
INPUT_NAMES = tuple(FIELDS) + ("sampling_parameters", "adapter_command")
ADAPTER_COMMANDS = ("list", "load", "unload")
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "ignore_eos")


@dataclass(frozen=True)
class AdapterCommand:
    """A management request (`adapter_command` = list | load | unload) instead of a generation."""

    command: str
    adapter_id: str | None


def parse_adapter_command(tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> AdapterCommand | None:
    """The management command a request carries, or None for an ordinary generation request."""
    raw = tensors.get("adapter_command")
    raw = _scalar("adapter_command", raw) if raw is not None else parameters.get("adapter_command")
    if raw is None:
        return None
    command = _text("adapter_command", raw)
    if command not in ADAPTER_COMMANDS:
        raise InvalidParameterError("adapter_command", f"{command!r} is not one of {', '.join(ADAPTER_COMMANDS)}")
    adapter = tensors.get("adapter_id")
    adapter = _text("adapter_id", _scalar("adapter_id", adapter)) if adapter is not None else parameters.get("adapter_id")
    if command != "list":
        if not adapter:
            raise InvalidParameterError("adapter_id", f"is required with adapter_command '{command}'")
        check_adapter_id(_text("adapter_id", adapter))
    return AdapterCommand(command, adapter or None)


def parse_request(request_id: str, tensors: dict[str, np.ndarray], parameters: dict[str, Any],
                  default_max_tokens: int) -> GenerationRequest:
    values: dict[str, Any] = {}
    raw_sampling = tensors.get("sampling_parameters")
    if raw_sampling is not None:
        values.update(_sampling_json(_scalar("sampling_parameters", raw_sampling)))
    elif "sampling_parameters" in parameters:
        values.update(_sampling_json(parameters["sampling_parameters"]))
    for name, value in parameters.items():
        if name.startswith("triton_") or name == "sampling_parameters":
            continue  # triton_*: set by Triton's own clients (e.g. triton_enable_empty_final_response)
        if name not in FIELDS:
            raise InvalidParameterError(name, f"unknown parameter; allowed: {', '.join(INPUT_NAMES)}")
        values[name] = value
    for name, array in tensors.items():
        if name in FIELDS:
            values[name] = list(array.reshape(-1)) if FIELDS[name] == "strs" else _scalar(name, array)
    typed = {name: _convert(name, FIELDS[name], value) for name, value in values.items()}

    prompt = typed.get("text_input")
    messages = parse_messages(typed["messages"]) if "messages" in typed else None
    if messages is not None and prompt:
        raise InvalidParameterError("messages", "give either text_input or messages, not both")
    if messages is None and not prompt:
        raise InvalidParameterError("text_input", "is required (or messages) and must be a non-empty string")
    adapter = typed.get("adapter_id") or typed.get("lora_name") or None
    if adapter:
        check_adapter_id(adapter, "adapter_id" if typed.get("adapter_id") else "lora_name")
    sampling = {k: typed[k] for k in _SAMPLING if k in typed}
    sampling.setdefault("max_tokens", default_max_tokens)
    if sampling.get("top_k") == -1:
        sampling["top_k"] = 0  # vLLM's spelling of "off"
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"])
    stream = typed.get("stream", False)
    # As Triton's vLLM backend: the whole text includes the prompt unless excluded; streams never do.
    exclude = typed.get("exclude_input_in_output", stream)
    if stream and not exclude:
        raise InvalidParameterError("exclude_input_in_output", "false is not allowed with stream=true "
                                                              "(streamed pieces never repeat the prompt)")
    return GenerationRequest(request_id=request_id, prompt=prompt or "", params=SamplingParams(**sampling),
                             adapter_id=adapter, stream=stream, exclude_input_in_output=exclude, messages=messages)


def _sampling_json(raw: Any) -> dict[str, Any]:
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise InvalidParameterError("sampling_parameters", f"must be a JSON object ({exc})") from None
    if not isinstance(parsed, dict):
        raise InvalidParameterError("sampling_parameters", "must be a JSON object")
    unknown = sorted(set(parsed) - set(FIELDS) - {"text_input"})
    if unknown:
        raise InvalidParameterError("sampling_parameters", f"unknown key(s) {unknown}; allowed: {', '.join(_SAMPLING)}, "
                                                           "adapter_id, lora_name, stream, exclude_input_in_output")
    return parsed


def _scalar(name: str, array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.size != 1:
        raise InvalidParameterError(name, f"must hold exactly one value, got {flat.size}")
    return flat[0]


def _convert(name: str, kind: str, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    try:
        if kind == "str":
            return _text(name, value)
        if kind == "strs":
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_text(name, v) for v in items]
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(value, (bytes, str)):
            value = _text(name, value)
            value = float(value) if kind == "float" else int(value)
        if isinstance(value, bool):
            raise ValueError
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (ValueError, TypeError, OverflowError):
        allowed = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
        raise InvalidParameterError(name, f"must be {allowed}, got {value!r}") from None


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameterError(name, "is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise InvalidParameterError(name, f"must be a string, got {type(value).__name__}")
