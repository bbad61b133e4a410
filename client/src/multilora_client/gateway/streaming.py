"""One lora_llm call per HTTP request, tied to that request's connection.

`CallStream` hands out lora_llm's responses one at a time, as they come (nothing is buffered), and
cancels the call on the server as soon as the HTTP client disconnects — also while waiting for a
response, not only when the next write fails — or when the gateway's drain time is over at shutdown
(drain.py; the caller then reads ShuttingDown). It never awaits while closing, so it is safe in the
cancelled scope in which Starlette ends a streaming response.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from ..errors import MultiLoraError
from ..response import Chunk, Generation
from .drain import Drain
from .errors import ClientGone

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either
_closing: set[asyncio.Task] = set()


class CallStream:
    def __init__(self, request: Request, chunks: AsyncIterator[Chunk], drain: Drain | None = None) -> None:
        self._chunks = chunks
        self._gone = asyncio.ensure_future(_disconnected(request))
        self._step: asyncio.Future | None = None
        self._drain = drain

    async def next(self) -> Chunk:
        """The next response; raises ClientGone if the client leaves first, ShuttingDown when the
        drain time ends first, MultiLoraError on errors."""
        self._step = asyncio.ensure_future(self._chunks.__anext__())
        deadline = self._drain.deadline if self._drain is not None else None
        try:
            await asyncio.wait({self._step, self._gone} | ({deadline} if deadline is not None else set()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not self._step.done():  # the client left, the drain time is over, or this task is cancelled
                self._step.cancel()  # -> the iterator's cleanup cancels the request on the server
        if not self._step.done() or self._step.cancelled():
            if deadline is not None and deadline.done() and not self._gone.done():
                raise self._drain.error()
            raise ClientGone()
        try:
            return self._step.result()
        except StopAsyncIteration:
            raise MultiLoraError("the server closed the stream before the final response") from None

    async def collect(self) -> Generation:
        """The whole answer (a non-streamed call has one response)."""
        chunks: list[Chunk] = []
        while True:
            chunk = await self.next()
            chunks.append(chunk)
            if chunk.final:
                return Generation.of(chunks)

    def close(self) -> None:
        """End the call if it still runs; never awaits (see the module docstring)."""
        self._gone.cancel()
        task = asyncio.ensure_future(_close(self._step, self._chunks))
        _closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_closing.discard)


async def open_call(request: Request, chunks: AsyncIterator[Chunk],
                    drain: Drain | None = None) -> tuple[CallStream, Chunk]:
    """Start a call and wait for its first response, so an error before any text (unknown adapter,
    bad field, server down) can still be answered with an HTTP error status."""
    call = CallStream(request, chunks, drain)
    try:
        return call, await call.next()
    except BaseException:
        call.close()
        raise


def sse(data: Any) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _disconnected(request: Request) -> None:
    # The body has been read already: the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _close(step: asyncio.Future | None, chunks: AsyncIterator[Chunk]) -> None:
    if step is not None:
        with contextlib.suppress(BaseException):
            await step  # a cancelled step has run the iterator's cleanup once this returns
    with contextlib.suppress(Exception):
        await chunks.aclose()  # type: ignore[attr-defined]
