"""A cap on request bodies, checked before any route runs.

Nothing a client may send needs more than a few MB (prompts are refused by their length on the
server anyway), and a body of several MB sent to tritonserver 2.51's HTTP front end crashes it
(docs/security.md): the gateway answers 413 instead of reading or forwarding such a body.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: reads the body (at most `max_bytes`), then hands it on, or answers 413."""

    def __init__(self, app: App, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send)
        messages, size = [], 0
        while True:  # the whole body (within the cap) before the app sees any of it
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, send: Callable[[Message], Awaitable[None]]) -> None:
        message = f"the request body is larger than this gateway's limit of {self.max_bytes} bytes"
        if scope.get("path", "").startswith("/v1"):  # OpenAI's error shape, else TGI's
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": "request_too_large"}}
        else:
            body = {"error": message, "error_type": "validation"}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
