"""Typed errors, so callers can `except UnknownAdapterError` instead of parsing messages.

The server reports every problem as a Triton error whose message names the field or adapter
(`unknown adapter 'nope': ...`, `invalid 'top_p': must be a number in (0, 1], got 1.5`). Over gRPC streaming
the message arrives without a status code, so the message decides first and the status (gRPC code
or HTTP status) only where the message says nothing we know. `map_error` is the one place where
that decision lives; `from_exception` only pulls message and status out of what the transports raise.
"""
from __future__ import annotations

import asyncio
import re
import socket

_UNKNOWN_ADAPTER = re.compile(r"unknown adapter '([^']*)'")
_INVALID_FIELD = re.compile(r"invalid '([^']*)'")
_ADAPTER_PROBLEM = re.compile(r"^adapter '([^']*)'")
_NOT_READY = ("failed to connect", "connection refused", "unknown model", "is not found", "not ready",
              "no available versions", "server is shutting down", "socket closed", "unavailable")
_TIMEOUT = ("deadline exceeded", "timed out", "timeout")
# The prompt plus max_tokens cannot fit: servers name the field to change (`invalid 'text_input': the
# prompt has ...`); older ones said no field, and max_tokens is what a client can always lower.
_TOO_LONG = ("max_model_len", "kv cache budget")


class MultiLoraError(Exception):
    """Base of every error this client raises; `message` is the server's text, unchanged."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UnknownAdapterError(MultiLoraError):
    """The adapter id is not in the server's adapter_dir (or the server has none)."""

    def __init__(self, message: str, status: str | None = None, adapter_id: str | None = None) -> None:
        super().__init__(message, status)
        self.adapter_id = adapter_id


class AdapterLoadError(MultiLoraError):
    """The adapter exists but cannot be served: broken files, or made for another base model."""

    def __init__(self, message: str, status: str | None = None, adapter_id: str | None = None) -> None:
        super().__init__(message, status)
        self.adapter_id = adapter_id


class InvalidParameterError(MultiLoraError):
    """A request field is wrong; `field` names it when the server (or this client) said which."""

    def __init__(self, message: str, status: str | None = None, field: str | None = None) -> None:
        super().__init__(message, status)
        self.field = field


class ServerNotReadyError(MultiLoraError):
    """Nothing answers at the URL, or the server/model is not (yet) ready: retrying later may help."""


class RequestTimeoutError(MultiLoraError):
    """No (further) answer within the client's timeout; the server may still be working on it."""


def map_error(message: str, status: str | int | None = None) -> MultiLoraError:
    """The one mapping from a server/transport message (and status, if any) to an error type."""
    text = message.strip()
    code = _normalize_status(status)
    lower = text.lower()
    if m := _UNKNOWN_ADAPTER.search(text):
        return UnknownAdapterError(text, code, adapter_id=m.group(1))
    if m := _INVALID_FIELD.search(text):
        return InvalidParameterError(text, code, field=m.group(1))
    if m := _ADAPTER_PROBLEM.search(text):
        return AdapterLoadError(text, code, adapter_id=m.group(1))
    if any(s in lower for s in _TOO_LONG):
        return InvalidParameterError(text, code, field="max_tokens")
    if code in ("DEADLINE_EXCEEDED", "408", "504") or any(s in lower for s in _TIMEOUT):
        return RequestTimeoutError(text, code)
    if code in ("UNAVAILABLE", "503", "404") or any(s in lower for s in _NOT_READY):
        return ServerNotReadyError(text, code)
    if code in ("INVALID_ARGUMENT", "400"):
        # e.g. "the prompt has N tokens and max_tokens is M; ... max_model_len": a request problem.
        return InvalidParameterError(text, code)
    if code == "NOT_FOUND":
        return UnknownAdapterError(text, code)
    return MultiLoraError(text, code)


def from_exception(exc: BaseException) -> MultiLoraError:
    """Wrap whatever a transport raised (tritonclient, aiohttp, urllib, sockets) via `map_error`."""
    if isinstance(exc, MultiLoraError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, socket.timeout, TimeoutError)):
        return RequestTimeoutError(f"request timed out ({exc or type(exc).__name__})")
    if isinstance(exc, (ConnectionError, OSError)) and not _has_message_api(exc):
        return ServerNotReadyError(f"cannot reach the server: {exc}")
    if _has_message_api(exc):  # tritonclient.utils.InferenceServerException
        return map_error(exc.message() or str(exc), exc.status())
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):  # grpc.RpcError
        return map_error(exc.details() or str(exc), exc.code())
    return map_error(str(exc) or type(exc).__name__)


def _has_message_api(exc: BaseException) -> bool:
    return callable(getattr(exc, "message", None)) and callable(getattr(exc, "status", None))


def _normalize_status(status: str | int | None) -> str | None:
    """'StatusCode.INVALID_ARGUMENT' -> 'INVALID_ARGUMENT'; 400 -> '400'."""
    if status is None or status == "":
        return None
    return str(status).rsplit(".", 1)[-1].upper()
