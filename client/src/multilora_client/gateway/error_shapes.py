"""An ApiError as the HTTP answer of the API its path belongs to: the one place that decides.

OpenAI under /v1 (`{"error": {"message", "type", "param", "code"}}`), KServe v2 under /v2 (Triton's
own `{"error": message}`), TGI everywhere else (`{"error", "error_type"}`, with its 422 / 424
statuses). Every 503 says when to try again (`Retry-After`): it means Triton is restarting or the
gateway is shutting down, both of which pass.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from . import openai_api, tgi_api
from .errors import ApiError

RETRY_AFTER_S = 5  # a restart of Triton takes one model load; clients retry in small steps meanwhile


def error_response(path: str, error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if error.status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    if path.startswith("/v1/"):
        return JSONResponse(openai_api.error_body(error), status_code=error.status, headers=headers)
    if path == "/v2" or path.startswith("/v2/"):
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)
    return JSONResponse(tgi_api.error_body(error), status_code=tgi_api.status(error), headers=headers)
