"""CallStream: one response at a time, and the call's cleanup (which cancels it on the server) as soon
as the HTTP client disconnects, even while a response is awaited."""
from __future__ import annotations

import asyncio

import pytest

from multilora_client.errors import InvalidParameterError
from multilora_client.gateway.errors import ClientGone
from multilora_client.gateway.streaming import CallStream, open_call, sse
from multilora_client.response import Chunk


class Connection:
    """What CallStream reads of a Starlette request: ASGI `receive`, here answering on demand."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_chunks_come_one_at_a_time_and_collect_joins_them():
    async def run():
        async def chunks():
            yield Chunk("a", False)
            yield Chunk("b", True, "length", 3, 2)

        first_stream, first = await open_call(Connection(), chunks())
        second = await first_stream.next()
        first_stream.close()

        async def again():
            yield Chunk("a", False)
            yield Chunk("b", True, "length", 3, 2)

        whole = await CallStream(Connection(), again()).collect()
        return first, second, whole

    first, second, whole = asyncio.run(run())
    assert (first.text, second.text, second.final) == ("a", "b", True)
    assert (whole.text, whole.finish_reason, whole.completion_tokens) == ("ab", "length", 2)


def test_a_disconnect_while_waiting_ends_the_call_at_once():
    cleaned = []

    async def run():
        connection = Connection()

        async def chunks():
            try:
                yield Chunk("a", False)
                await asyncio.sleep(3600)  # lora_llm is slow to send the next piece
                yield Chunk("never", True)
            finally:
                cleaned.append(True)  # AsyncClient cancels the Triton request here

        stream, _ = await open_call(connection, chunks())
        asyncio.get_running_loop().call_later(0.05, connection.gone.set)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(stream.next(), 5)
        stream.close()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert cleaned == [True]


def test_an_error_before_any_text_reaches_the_caller_and_closes_the_call():
    async def run():
        async def chunks():
            raise InvalidParameterError("invalid 'top_p': must be in (0, 1]", field="top_p")
            yield  # an async generator

        return await open_call(Connection(), chunks())

    with pytest.raises(InvalidParameterError, match="top_p"):
        asyncio.run(run())


def test_server_sent_events():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse("[DONE]") == b"data: [DONE]\n\n"
