"""The synchronous client: `Client(url).generate(prompt, adapter_id="sql")`.

lora_llm is a decoupled model, which Triton serves only through gRPC streaming
(`ModelStreamInfer`) and the HTTP generate extension (`/generate`, `/generate_stream`); its plain
`infer` endpoints answer "doesn't support models with decoupled transaction policy". So:
- gRPC: tritonclient's stream API, one stream per call (a tritonclient gRPC client holds one
  stream at a time, and per-call streams keep `Client` safe to share between threads);
- HTTP: tritonclient.http for health checks; the generate extension, which tritonclient does
  not wrap, through the standard library (JSON, and server-sent events when streaming).
"""
from __future__ import annotations

import contextlib
import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

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
    collect,
    http_error_message,
    parse_adapters,
    parse_command_result,
)
from .streams import TextStream


class Client:
    """Talks to lora_llm over gRPC (default) or HTTP; every failure is a `MultiLoraError`.

    `timeout` (seconds) bounds the wait for each response, not the whole generation, so a long
    stream that keeps producing is never cut off; None waits forever.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, model: str = MODEL_NAME,
                 timeout: float | None = 60.0, management_token: str | None = None) -> None:
        self.endpoint: Endpoint = parse_endpoint(url, protocol, model)
        self.timeout = timeout
        self.management_token = management_token  # sent with load and unload

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt: str, adapter_id: str | None = None, **sampling: Any) -> Generation:
        """The whole answer at once (one response from the server)."""
        request = build_request(prompt, adapter_id, stream=False, **sampling)
        with contextlib.closing(self._chunks(request)) as chunks:
            return collect(chunks)

    def stream(self, prompt: str, adapter_id: str | None = None, **sampling: Any) -> TextStream:
        """Text pieces as the server produces them; `.generation` holds the totals at the end."""
        return TextStream(self._chunks(build_request(prompt, adapter_id, stream=True, **sampling)))

    def chat(self, messages: list[dict[str, Any]], adapter_id: str | None = None, **sampling: Any) -> Generation:
        """The answer to a chat (OpenAI-style messages), rendered with the server's chat template."""
        request = build_chat(messages, adapter_id, stream=False, **sampling)
        with contextlib.closing(self._chunks(request)) as chunks:
            return collect(chunks)

    def chat_stream(self, messages: list[dict[str, Any]], adapter_id: str | None = None, **sampling: Any) -> TextStream:
        """The answer to a chat, piece by piece; `.generation` holds the totals at the end."""
        return TextStream(self._chunks(build_chat(messages, adapter_id, stream=True, **sampling)))

    # -- adapters ---------------------------------------------------------------------------
    def adapters(self) -> Adapters:
        """Which adapters are on disk, in host memory, and on the device."""
        return parse_adapters(self._command(adapter_command_parameters("list")))

    def load_adapter(self, adapter_id: str) -> dict[str, Any]:
        """Load an adapter ahead of its first request, so that request does not pay for it."""
        parameters = adapter_command_parameters("load", adapter_id, self.management_token)
        return parse_command_result(self._command(parameters))

    def unload_adapter(self, adapter_id: str) -> dict[str, Any]:
        """Drop an adapter from the caches (its files stay on disk)."""
        parameters = adapter_command_parameters("unload", adapter_id, self.management_token)
        return parse_command_result(self._command(parameters))

    # -- health -----------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server and the model both answer ready."""
        try:
            client = self._health_client()
            try:
                return bool(client.is_server_ready() and client.is_model_ready(self.endpoint.model))
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Block until ready; raises ServerNotReadyError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise ServerNotReadyError(f"{self.endpoint.protocol} {self.endpoint.target}: model "
                                          f"'{self.endpoint.model}' not ready after {timeout:.0f} s")
            time.sleep(interval)

    # -- transports -------------------------------------------------------------------------
    def _health_client(self) -> Any:
        if self.endpoint.protocol == "grpc":
            return grpcclient.InferenceServerClient(self.endpoint.target, ssl=self.endpoint.ssl)
        return httpclient.InferenceServerClient(self.endpoint.target, ssl=self.endpoint.ssl,
                                                connection_timeout=self.timeout or 60.0,
                                                network_timeout=self.timeout or 60.0)

    def _chunks(self, request: GenerateRequest) -> Iterator[Chunk]:
        if self.endpoint.protocol == "grpc":
            return self._grpc_chunks(grpc_inputs(request.tensors()), None)
        endpoint = "generate_stream" if request.stream else "generate"
        return self._http_chunks(endpoint, request.http_body(), request.sampling.get("n", 1))

    def _command(self, parameters: dict[str, str]) -> str:
        if self.endpoint.protocol == "grpc":
            chunks = self._grpc_chunks(grpc_inputs(command_tensors(parameters)), {})
        else:
            chunks = self._http_chunks("generate", {"parameters": parameters})
        with contextlib.closing(chunks):
            return collect(chunks).text

    def _grpc_chunks(self, inputs: list[Any], parameters: dict[str, Any] | None) -> Iterator[Chunk]:
        client = grpcclient.InferenceServerClient(self.endpoint.target, ssl=self.endpoint.ssl)
        results: queue.Queue = queue.Queue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            try:
                client.async_stream_infer(self.endpoint.model, inputs, parameters=parameters,
                                          enable_empty_final_response=True)
            except Exception:  # noqa: BLE001
                # A broken stream (nothing listening, ...) says why through the callback only.
                with contextlib.suppress(queue.Empty):
                    _, error = results.get(timeout=1.0)
                    if error is not None:
                        exc = error
                finished = True
                raise from_exception(exc) from None
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise RequestTimeoutError(f"no response from {self.endpoint.target} "
                                              f"within {self.timeout} s") from None
                if error is not None:
                    finished = True  # an error response is the request's last
                    raise from_exception(error)
                for chunk in chunks_from_grpc(result):
                    finished = chunk.final
                    yield chunk
                if finished:
                    return
        except MultiLoraError:
            raise
        except Exception as exc:  # noqa: BLE001 - tritonclient / grpc raise many types
            raise from_exception(exc) from exc
        finally:
            # Early exit (break, timeout): cancel the request on the server instead of waiting.
            with contextlib.suppress(Exception):
                client.stop_stream(cancel_requests=not finished)
            with contextlib.suppress(Exception):
                client.close()

    def _http_chunks(self, endpoint: str, body: dict[str, Any], choices: int = 1) -> Iterator[Chunk]:
        request = urllib.request.Request(self.endpoint.model_url(endpoint), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise map_error(http_error_message(err.read()), err.code) from None
        except Exception as exc:  # noqa: BLE001 - URLError, timeouts, connection resets
            raise from_exception(getattr(exc, "reason", exc)) from exc
        with response:  # closing the connection early is how an HTTP client cancels
            try:
                if endpoint == "generate":
                    yield from chunks_from_json(json.loads(response.read()), final=True)
                    return
                events = SseChunks(choices)
                for line in response:
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

