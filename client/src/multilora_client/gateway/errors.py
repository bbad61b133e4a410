"""One error type for both APIs, and the one mapping from lora_llm's errors to HTTP statuses.

Each API renders an `ApiError` in its own shape (openai_api.error_body, tgi_api.error_body).
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import (
    AdapterLoadError,
    InvalidParameterError,
    MultiLoraError,
    RequestTimeoutError,
    ServerNotReadyError,
    UnknownAdapterError,
)

ADAPTER_FIELDS = ("adapter_id", "lora_name")


class ApiError(Exception):
    """An HTTP error answer: status, the message the client reads, the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientGone(Exception):
    """The HTTP client disconnected; its lora_llm request has been cancelled."""


class ShuttingDown(MultiLoraError):
    """The gateway's drain time is over (drain.py): the answer was cut before its end."""


def from_backend(error: MultiLoraError, params: Mapping[str, str], model: str | None = None) -> ApiError:
    """The HTTP answer to an error of lora_llm (or of the Triton connection).

    `params` renames lora_llm's field names to the API's; `model` is the name the client asked for.
    """
    message = error.message
    field = getattr(error, "field", None)
    if isinstance(error, UnknownAdapterError) or (isinstance(error, InvalidParameterError) and field in ADAPTER_FIELDS):
        if model is not None:
            message = f"The model '{model}' does not exist ({message})"
        return ApiError(404, message, params.get("adapter_id", "adapter_id"), "model_not_found")
    if isinstance(error, InvalidParameterError):
        return ApiError(400, message, params.get(field or "", field), "invalid_parameter")
    if isinstance(error, ShuttingDown):
        return ApiError(503, message, None, "service_unavailable")
    if isinstance(error, ServerNotReadyError):
        return ApiError(503, f"the inference server is not ready: {message}", None, "service_unavailable")
    if isinstance(error, RequestTimeoutError):
        return ApiError(504, message, None, "timeout")
    if isinstance(error, AdapterLoadError):  # the adapter's files are broken: the operator's to fix
        return ApiError(500, message, params.get("adapter_id", "adapter_id"), "adapter_load_failed")
    return ApiError(500, message, None, "internal_error")
