"""The asyncio client: `async with AsyncClient(url) as c: await c.generate(...)`.

Same surface as `Client`. gRPC goes through `tritonclient.grpc.aio` (one bidirectional stream per
call, so many calls can run at once on one client); HTTP uses `tritonclient.http.aio` for health
and aiohttp (tritonclient's own HTTP dependency) for the generate extension it does not wrap.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio

from .endpoint import Endpoint, parse_endpoint
from .errors import MultiLoraError, RequestTimeoutError, ServerNotReadyError, from_exception, map_error
from .request import (
    MODEL_NAME,
    GenerateRequest,
    adapter_command_parameters,
    build_chat,
    build_request,
    command_tensors,
    grpc_inputs,
)
from .response import (
    Adapters,
    Chunk,
    Generation,
    SseChunks,
    chunks_from_grpc,
    chunks_from_json,
    http_error_message,
    parse_adapters,
    parse_command_result,
)
from .streams import AsyncTextStream


class AsyncClient:
    """Asyncio client for lora_llm; create it inside the event loop that uses it.

    `timeout` (seconds) bounds the wait for each response; None waits forever.
    `reconnect_backoff_s` caps the wait between gRPC reconnection attempts to a server that went
    away (gRPC's own cap is 120 s, so a long-lived client, like the gateway, could answer "not
    ready" for up to two minutes after a restarted server is back); None keeps gRPC's.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, model: str = MODEL_NAME,
                 timeout: float | None = 60.0, management_token: str | None = None,
                 reconnect_backoff_s: float | None = None) -> None:
        self.endpoint: Endpoint = parse_endpoint(url, protocol, model)
        self.timeout = timeout
        self.management_token = management_token  # sent with load and unload
        self.reconnect_backoff_s = reconnect_backoff_s
        self._grpc: grpcaio.InferenceServerClient | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections this client opened."""
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- generation -------------------------------------------------------------------------
    async def generate(self, prompt: str, adapter_id: str | None = None, **sampling: Any) -> Generation:
        """The whole answer at once (one response from the server)."""
        request = build_request(prompt, adapter_id, stream=False, **sampling)
        return await _collect(self._chunks(request))

    def stream(self, prompt: str, adapter_id: str | None = None, **sampling: Any) -> AsyncTextStream:
        """Text pieces as they come: `async for piece in client.stream(...)`."""
        return AsyncTextStream(self._chunks(build_request(prompt, adapter_id, stream=True, **sampling)))

    async def chat(self, messages: list[dict[str, Any]], adapter_id: str | None = None, **sampling: Any) -> Generation:
        """The answer to a chat (OpenAI-style messages), rendered with the server's chat template."""
        return await _collect(self._chunks(build_chat(messages, adapter_id, stream=False, **sampling)))

    def chat_stream(self, messages: list[dict[str, Any]], adapter_id: str | None = None,
                    **sampling: Any) -> AsyncTextStream:
        """The answer to a chat, piece by piece: `async for piece in client.chat_stream(...)`."""
        return AsyncTextStream(self._chunks(build_chat(messages, adapter_id, stream=True, **sampling)))

    # -- adapters ---------------------------------------------------------------------------
    async def adapters(self) -> Adapters:
        """Which adapters are on disk, in host memory, and on the device."""
        return parse_adapters(await self._command(adapter_command_parameters("list")))

    async def load_adapter(self, adapter_id: str) -> dict[str, Any]:
        """Load an adapter ahead of its first request."""
        parameters = adapter_command_parameters("load", adapter_id, self.management_token)
        return parse_command_result(await self._command(parameters))

    async def unload_adapter(self, adapter_id: str) -> dict[str, Any]:
        """Drop an adapter from the caches (its files stay on disk)."""
        parameters = adapter_command_parameters("unload", adapter_id, self.management_token)
        return parse_command_result(await self._command(parameters))

    # -- health -----------------------------------------------------------------------------
    async def is_ready(self) -> bool:
        """True when the server and the model both answer ready."""
        try:
            if self.endpoint.protocol == "grpc":
                client = self._grpc_client()
                return bool(await client.is_server_ready() and await client.is_model_ready(self.endpoint.model))
            async with httpaio.InferenceServerClient(self.endpoint.target, ssl=self.endpoint.ssl) as http:
                return bool(await http.is_server_ready() and await http.is_model_ready(self.endpoint.model))
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Wait until ready; raises ServerNotReadyError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.is_ready():
            if loop.time() > deadline:
                raise ServerNotReadyError(f"{self.endpoint.protocol} {self.endpoint.target}: model "
                                          f"'{self.endpoint.model}' not ready after {timeout:.0f} s")
            await asyncio.sleep(interval)

    # -- transports -------------------------------------------------------------------------
    def _grpc_client(self) -> grpcaio.InferenceServerClient:
        if self._grpc is None:
            channel_args = None  # tritonclient's defaults
            if self.reconnect_backoff_s is not None:  # replacing them: keep its unlimited message sizes
                backoff_ms = int(self.reconnect_backoff_s * 1000)
                channel_args = [("grpc.max_send_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
                                ("grpc.max_receive_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
                                ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
                                ("grpc.max_reconnect_backoff_ms", backoff_ms)]
            self._grpc = grpcaio.InferenceServerClient(self.endpoint.target, ssl=self.endpoint.ssl,
                                                       channel_args=channel_args)
        return self._grpc

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Per-read timeout, like the gRPC path: long streams are fine while they keep talking.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout))
        return self._session

    def _chunks(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.endpoint.protocol == "grpc":
            return self._grpc_chunks(grpc_inputs(request.tensors()), {})
        endpoint = "generate_stream" if request.stream else "generate"
        return self._http_chunks(endpoint, request.http_body(), request.sampling.get("n", 1))

    async def _command(self, parameters: dict[str, Any]) -> str:
        if self.endpoint.protocol == "grpc":
            chunks = self._grpc_chunks(grpc_inputs(command_tensors(parameters)), {})
        else:
            chunks = self._http_chunks("generate", {"parameters": parameters})
        return (await _collect(chunks)).text

    async def _grpc_chunks(self, inputs: list[Any], parameters: dict[str, Any]) -> AsyncIterator[Chunk]:
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            # The sync client's enable_empty_final_response, spelled as the parameter it sets.
            yield {"model_name": self.endpoint.model, "inputs": inputs,
                   "parameters": {**parameters, "triton_enable_empty_final_response": True}}
            await done.wait()  # keep our side open until the request is over

        finished = False
        try:
            responses = self._grpc_client().stream_infer(requests())
        except Exception as exc:  # noqa: BLE001
            raise from_exception(exc) from exc
        try:
            while not finished:
                try:
                    result, error = await asyncio.wait_for(responses.__anext__(), self.timeout)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"no response from {self.endpoint.target} "
                                              f"within {self.timeout} s") from None
                except StopAsyncIteration:
                    return
                if error is not None:
                    finished = True
                    raise from_exception(error)
                for chunk in chunks_from_grpc(result):
                    finished = chunk.final
                    yield chunk
        except MultiLoraError:
            raise
        except Exception as exc:  # noqa: BLE001 - grpc.aio raises its own types
            raise from_exception(exc) from exc
        finally:
            done.set()
            if not finished:
                responses.cancel()  # early exit: cancel the request on the server

    async def _http_chunks(self, endpoint: str, body: dict[str, Any], choices: int = 1) -> AsyncIterator[Chunk]:
        try:
            response = await self._http_session().post(self.endpoint.model_url(endpoint), json=body)
        except Exception as exc:  # noqa: BLE001 - aiohttp.ClientConnectorError, timeouts
            raise from_exception(exc) from exc
        async with response:  # leaving early closes the connection: the server cancels
            try:
                if response.status != 200:
                    raise map_error(http_error_message(await response.read()), response.status)
                if endpoint == "generate":
                    for chunk in chunks_from_json(json.loads(await response.read()), final=True):
                        yield chunk
                    return
                events = SseChunks(choices)
                async for line in response.content:
                    chunk = events.chunk(line)
                    if chunk is None:
                        continue
                    yield chunk
                    if chunk.final:
                        return
            except MultiLoraError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise from_exception(exc) from exc


async def _collect(chunks: AsyncIterator[Chunk]) -> Generation:
    """Async twin of response.collect; closes the iterator so the transport cleans up."""
    seen: list[Chunk] = []
    try:
        async for chunk in chunks:
            seen.append(chunk)
            if chunk.final:
                return Generation.of(seen)
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
    raise MultiLoraError("the server closed the stream before the final response")

