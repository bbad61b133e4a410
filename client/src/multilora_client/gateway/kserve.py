"""KServe v2 over HTTP, passed through to Triton's own HTTP port after the gateway's checks.

tritonserver 2.51 dies of one HTTP body nested 1,000,000 deep or of a few MB (docs/security.md),
so its HTTP port stays on loopback and KServe v2 HTTP clients come through here: the body has been
bounded in size, JSON nesting, integer length and text (limits.py) before it is forwarded, unchanged,
to `--triton-http`. Only inference and what inference clients read are forwarded: health, server and
model metadata, model readiness, `infer`, `generate` and `generate_stream`. The model repository,
configuration, statistics, logging, trace and shared-memory APIs are for operators, on Triton's own
port, and are refused here with 403.

Errors are Triton's own shape, `{"error": message}`; a Triton that does not answer is a 503 with
Retry-After. At shutdown a forwarded answer is cut at the drain deadline like the others (drain.py):
a whole answer becomes a 503, a `generate_stream` ends with an error event.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .drain import Drain
from .errors import ApiError, ShuttingDown
from .streaming import SSE_HEADERS, sse

T = TypeVar("T")
_MODEL = r"/v2/models/(?!stats(?:/|$))[^/]+(?:/versions/[^/]+)?"  # /v2/models/stats: statistics
FORWARDED = {
    "GET": re.compile(rf"/v2|/v2/health/(?:live|ready)|{_MODEL}|{_MODEL}/ready"),
    "POST": re.compile(rf"{_MODEL}/(?:infer|generate|generate_stream)"),
}
# What a KServe client sends and reads besides the body (the binary tensor extension's header length).
REQUEST_HEADERS = ("content-type", "accept", "inference-header-content-length")
RESPONSE_HEADERS = ("content-type", "inference-header-content-length")


def forwarded(method: str, path: str) -> bool:
    pattern = FORWARDED.get(method)
    return pattern is not None and pattern.fullmatch(path) is not None


class KServeProxy:
    """Create inside the event loop that uses it (its aiohttp session belongs to that loop)."""

    def __init__(self, triton_http: str, timeout: float | None) -> None:
        self.base_url = triton_http.rstrip("/")
        # Per read, as the gRPC side: a long stream is fine while it keeps talking.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout))

    async def close(self) -> None:
        await self._session.close()

    async def forward(self, request: Request, drain: Drain) -> Response:
        path = request.url.path
        if not forwarded(request.method, path):
            raise ApiError(403, f"{request.method} {path} is not forwarded by this gateway: it passes on health, "
                                "metadata, ready, infer, generate and generate_stream; the other Triton APIs are "
                                "for operators, on Triton's own port", None, "forbidden")
        url = self.base_url + path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        try:
            upstream = await _before_deadline(
                self._session.request(request.method, url, data=await request.body(), headers=headers), drain)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ApiError(503, f"Triton's HTTP endpoint does not answer: {exc or type(exc).__name__}", None,
                           "service_unavailable") from None
        answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() in RESPONSE_HEADERS}
        if path.endswith("/generate_stream") and upstream.status == 200:
            return StreamingResponse(_relay(upstream, drain), status_code=200, headers=SSE_HEADERS,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"))
        try:
            body = await _before_deadline(upstream.read(), drain)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ApiError(503, f"Triton's HTTP endpoint stopped answering: {exc or type(exc).__name__}", None,
                           "service_unavailable") from None
        finally:
            upstream.release()
        return Response(body, status_code=upstream.status, headers=answer_headers)


async def _relay(upstream: aiohttp.ClientResponse, drain: Drain) -> AsyncIterator[bytes]:
    """generate_stream's events as they come; at the drain deadline, an error event ends them."""
    try:
        while chunk := await _before_deadline(upstream.content.readany(), drain):
            yield chunk
    except ShuttingDown as error:
        yield b"\n\n" + sse({"error": error.message})  # after a cut event, if the cut fell inside one
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        yield b"\n\n" + sse({"error": f"Triton's HTTP endpoint stopped answering: {exc or type(exc).__name__}"})
    finally:
        upstream.close()


async def _before_deadline(step: Awaitable[T], drain: Drain) -> T:
    """`step`'s result, or ShuttingDown (the step cancelled) when the drain deadline comes first."""
    task = asyncio.ensure_future(step)
    if drain.deadline is None:
        return await task
    await asyncio.wait({task, drain.deadline}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        raise drain.error()
    return task.result()
