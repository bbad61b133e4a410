"""Checks on request bodies, made before any route (or Triton) sees them.

- size: nothing a client may send needs more than a few MB (prompts are refused by their length on
  the server anyway), and a body of several MB sent to tritonserver 2.51's HTTP front end crashes it
  (docs/security.md): 413 instead of reading or forwarding more;
- JSON nesting: 2.51's JSON parser recurses once per level and dies of a body nested 1,000,000
  deep; no request here needs more than a handful of levels;
- integers longer than Python converts (4300 digits): json.loads raises a plain ValueError there,
  which used to surface as a parse error without a field;
- lone UTF-16 surrogates (`"\\ud800"`): valid JSON escapes, but no text: they cannot be encoded to
  UTF-8 for Triton, nor tokenized.

Each problem is a 400 (413 for the size) naming the field, in the shape of the API the path belongs
to. A body that is not JSON at all is left to the route, which says so in its own terms.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .error_shapes import error_response
from .errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_DEPTH = 32  # the deepest request here (chat content parts, a KServe tensor's data) needs about 6
# KServe's binary tensor extension: a JSON header of this many bytes, then raw tensor data.
BINARY_HEADER = b"inference-header-content-length"
_SURROGATE = re.compile("[\ud800-\udfff]")


class _LongInteger(str):
    """An integer literal json.loads would refuse to convert, kept as text so its field can be named."""


# A lone surrogate can only come from a \uD800-\uDFFF escape (raw UTF-8 cannot encode one), so the
# strings are only searched when the body has such an escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class BodyLimit:
    """ASGI middleware: reads the body (at most `max_bytes`), checks its JSON, then hands it on."""

    def __init__(self, app: App, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, self._too_large())
        messages, size = [], 0
        while True:  # the whole body (within the cap) before the app sees any of it
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, self._too_large())
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        problem = check_json(json_part(body, headers.get(BINARY_HEADER)))
        if problem is not None:
            return await self._refuse(scope, receive, send, problem)
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this gateway's limit of {self.max_bytes} bytes",
                        None, "request_too_large")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        response = error_response(scope.get("path", ""), error, {"Connection": "close"})
        await response(scope, receive, send)


def json_part(body: bytes, binary_header_length: bytes | None) -> bytes:
    """The JSON of a body: all of it, or the header before KServe binary tensor data."""
    if binary_header_length is not None and binary_header_length.isdigit():
        return body[:int(binary_header_length)]
    return body


def check_json(data: bytes) -> ApiError | None:
    """The first problem of a JSON body that would pass json.loads but break what comes after;
    None for a sound body, an empty one, or one that is not JSON at all (the route says so)."""
    if not data.strip():
        return None
    try:
        value = json.loads(data)
    except RecursionError:
        return _too_deep()
    except ValueError:  # not JSON (JSONDecodeError, not UTF-8), or an integer too long to convert
        try:
            value = json.loads(data, parse_int=_integer)
        except RecursionError:
            return _too_deep()
        except ValueError:
            return None
    return _first_problem(value, {dict, list, _LongInteger} | ({str} if _SURROGATE_ESCAPE.search(data) else set()))


def _integer(text: str) -> int | str:
    limit = sys.get_int_max_str_digits()
    return _LongInteger(text) if limit and len(text.lstrip("-")) > limit else int(text)


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body is JSON nested more than {MAX_JSON_DEPTH} levels deep; no request "
                         "needs that many", None, "invalid_json")


def _first_problem(value: Any, walked: set[type]) -> ApiError | None:
    """Walks the parsed body without recursing, into the `walked` types: depth, long integers, lone
    surrogates. Each entry carries its place as a linked (parent, key) pair, spelled out only for
    the error."""
    stack: list[tuple[Any, int, tuple | None]] = [(value, 0, None)]
    while stack:
        item, depth, place = stack.pop()
        if isinstance(item, _LongInteger):
            return _field_error(place, f"an integer of {len(item.lstrip('-'))} digits is out of range for any "
                                       f"field (numbers of more than {sys.get_int_max_str_digits()} digits are "
                                       "not even read)")
        if isinstance(item, str):
            if (found := _SURROGATE.search(item)) is not None:
                return _field_error(place, f"contains a lone UTF-16 surrogate ({ascii(found.group())[1:-1]} at "
                                           f"character {found.start()}); text must be valid Unicode: an escape "
                                           "from \\ud800 to \\udfff is only valid as half of a surrogate pair")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            return _too_deep()
        if isinstance(item, dict):
            for key in item if str in walked else ():
                if _SURROGATE.search(key):
                    return _field_error(place, f"has a key with a lone UTF-16 surrogate: {ascii(key)}")
            children = item.items()
        else:
            children = enumerate(item)
        stack.extend((child, depth + 1, (place, key)) for key, child in children if type(child) in walked)
    return None


def _field_error(place: tuple | None, message: str) -> ApiError:
    keys = []
    while place is not None:
        place, key = place
        keys.append(str(key))
    field = ".".join(reversed(keys)) or None
    return ApiError(400, f"invalid '{field}': {message}" if field else f"the request body {message}", field,
                    "invalid_parameter")
