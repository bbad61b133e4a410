"""Iterators of text pieces that also keep the final `Generation` (finish reason, token counts).

`stream()` is meant to be used as `for piece in client.stream(...)`, yet a CLI or a UI also wants
to know why the answer ended; `.generation` holds that once the iteration is over. Closing the
stream early (break, `close()`) cancels the request on the server through the transport's cleanup.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from .errors import MultiLoraError
from .response import Chunk, Generation


class TextStream(Iterator[str]):
    """Yields each response's new text; `generation` is set after the final response."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._received: list[Chunk] = []
        self.generation: Generation | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.generation is None:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                raise MultiLoraError("the server closed the stream before the final response") from None
            self._received.append(chunk)
            if chunk.final:
                self.generation = Generation.of(self._received)
                self.close()
            if chunk.text:
                return chunk.text
        raise StopIteration

    def close(self) -> None:
        """Stop reading; cancels the request if it is still running."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTextStream(AsyncIterator[str]):
    """The asyncio twin of TextStream: `async for piece in client.stream(...)`."""

    def __init__(self, chunks: AsyncIterator[Chunk]) -> None:
        self._chunks = chunks
        self._received: list[Chunk] = []
        self.generation: Generation | None = None

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        while self.generation is None:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise MultiLoraError("the server closed the stream before the final response") from None
            self._received.append(chunk)
            if chunk.final:
                self.generation = Generation.of(self._received)
                await self.aclose()
            if chunk.text:
                return chunk.text
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it is still running."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
