"""The gateway's HTTP routes: OpenAI's under /v1, TGI's at /generate, /generate_stream and /, and
KServe v2 under /v2, passed through to Triton's HTTP port (kserve.py) when one is given.

Each request is one lora_llm call over gRPC streaming (triton.py), read one response at a time
(streaming.py); errors become each API's own error shape with the status that `errors.from_backend`
decides.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import MultiLoraError
from ..request import MODEL_NAME
from ..response import Chunk, Generation
from . import openai_api, tgi_api
from .drain import Drain
from .error_shapes import RETRY_AFTER_S, error_response
from .errors import ApiError, ClientGone, from_backend
from .kserve import KServeProxy
from .limits import BodyLimit
from .streaming import SSE_HEADERS, CallStream, open_call, sse
from .triton import Triton

OpenAIRequest = openai_api.ChatCompletionRequest | openai_api.CompletionRequest


@dataclass(frozen=True)
class GatewayConfig:
    triton_grpc: str = "localhost:8001"  # host:port of Triton's gRPC endpoint
    model: str = MODEL_NAME  # the Triton model to call
    base_model_name: str | None = None  # OpenAI `model` of the base; None: from the server's base_model
    default_max_tokens: int = 256  # when a request gives no max_tokens / max_new_tokens
    timeout: float = 300.0  # seconds to wait for each response from Triton (a whole non-streamed answer)
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 (gateway/limits.py)
    drain_timeout: float = 30.0  # at shutdown, seconds running answers may still take (gateway/drain.py)
    triton_http: str | None = None  # Triton's HTTP URL for the KServe v2 pass-through; None: /v2 is off


def create_app(config: GatewayConfig = GatewayConfig()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.triton = Triton(config.triton_grpc, config.model, config.timeout, config.base_model_name)
        app.state.drain.attach(asyncio.get_running_loop())
        app.state.kserve = KServeProxy(config.triton_http, config.timeout) if config.triton_http else None
        yield
        await app.state.triton.close()
        if app.state.kserve is not None:
            await app.state.kserve.close()

    app = FastAPI(title="multilora gateway", summary="OpenAI- and TGI-compatible HTTP in front of lora_llm",
                  lifespan=lifespan)
    app.state.config = config
    app.state.drain = Drain(config.drain_timeout)
    app.state.started = int(time.time())
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(MultiLoraError, _backend_error)
    app.add_exception_handler(ClientGone, _client_gone)
    _openai_routes(app)
    _tgi_routes(app)
    _kserve_routes(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


# -- OpenAI ---------------------------------------------------------------------------------------
def _openai_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        triton: Triton = request.app.state.triton
        return openai_api.model_list(await triton.base_model_name(), await triton.adapter_ids(), app.state.started)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        triton: Triton = request.app.state.triton
        base = await triton.base_model_name()
        if model_id != base and model_id not in await triton.adapter_ids():
            raise ApiError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return openai_api.model_card(model_id, None if model_id == base else base, app.state.started)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: openai_api.ChatCompletionRequest, request: Request) -> Response:
        return await _openai_answer(request, body, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(body: openai_api.CompletionRequest, request: Request) -> Response:
        return await _openai_answer(request, body, "cmpl")


async def _openai_answer(request: Request, body: OpenAIRequest, id_prefix: str) -> Response:
    triton: Triton = request.app.state.triton
    request.state.model = body.model  # named in an unknown-model error
    adapter_id = None if body.model == await triton.base_model_name() else body.model
    call = openai_api.triton_call(body, adapter_id, request.app.state.config.default_max_tokens)
    reply = openai_api.Reply(body, id_prefix)
    if not body.stream:
        return JSONResponse(reply.whole(await _whole(request, triton.chunks(call))))
    stream, first = await open_call(request, triton.chunks(call), request.app.state.drain)
    return _event_stream(_openai_events(reply, stream, first))


async def _openai_events(reply: openai_api.Reply, stream: CallStream, first: Chunk) -> AsyncIterator[bytes]:
    try:
        async for chunk in _chunks(stream, first):
            for event in reply.chunks(chunk, chunk is first):
                yield sse(event)
        yield sse("[DONE]")
    except MultiLoraError as error:  # after the 200 status line: the error goes into the stream
        yield sse(openai_api.error_body(from_backend(error, openai_api.PARAMS, reply.body.model)))


# -- TGI ------------------------------------------------------------------------------------------
def _tgi_routes(app: FastAPI) -> None:
    @app.post("/generate")
    async def generate(body: tgi_api.GenerateRequest, request: Request) -> Response:
        return await _tgi_answer(request, body, stream=False, as_list=False)

    @app.post("/generate_stream")
    async def generate_stream(body: tgi_api.GenerateRequest, request: Request) -> Response:
        return await _tgi_answer(request, body, stream=True, as_list=False)

    @app.post("/")
    async def compat_generate(body: tgi_api.GenerateRequest, request: Request) -> Response:
        """TGI's compatibility route (what huggingface_hub's InferenceClient(base_url=...) posts to)."""
        return await _tgi_answer(request, body, stream=body.stream, as_list=True)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if await request.app.state.triton.is_ready():
            return Response(status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})


async def _tgi_answer(request: Request, body: tgi_api.GenerateRequest, stream: bool, as_list: bool) -> Response:
    triton: Triton = request.app.state.triton
    call, seed = tgi_api.triton_call(body, stream, request.app.state.config.default_max_tokens)
    if not stream:
        answer = tgi_api.response(body, await _whole(request, triton.chunks(call)), seed)
        return JSONResponse([answer] if as_list else answer)  # POST / answers a list, as TGI
    call_stream, first = await open_call(request, triton.chunks(call), request.app.state.drain)
    return _event_stream(_tgi_events(body, call_stream, first, seed))


async def _tgi_events(body: tgi_api.GenerateRequest, stream: CallStream, first: Chunk,
                      seed: int | None) -> AsyncIterator[bytes]:
    text, index = "", 0
    try:
        async for chunk in _chunks(stream, first):
            text += chunk.text
            for event in tgi_api.stream_events(body, chunk, index, text, seed):
                yield sse(event)
                index += 1
    except MultiLoraError as error:
        yield sse(tgi_api.error_body(from_backend(error, tgi_api.PARAMS)))


# -- KServe v2 ------------------------------------------------------------------------------------
def _kserve_routes(app: FastAPI) -> None:
    @app.api_route("/v2{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    async def kserve(request: Request) -> Response:
        proxy: KServeProxy | None = request.app.state.kserve
        if proxy is None:
            raise ApiError(404, "this gateway does not pass KServe v2 on to Triton (start it with --triton-http URL)",
                           None, "not_found")
        return await proxy.forward(request, request.app.state.drain)


# -- shared ---------------------------------------------------------------------------------------
async def _whole(request: Request, chunks: AsyncIterator[Chunk]) -> Generation:
    stream = CallStream(request, chunks, request.app.state.drain)
    try:
        return await stream.collect()
    finally:
        stream.close()


async def _chunks(stream: CallStream, first: Chunk) -> AsyncIterator[Chunk]:
    """`first`, then each response up to the final one; ends quietly if the client leaves."""
    try:
        chunk = first
        yield chunk
        while not chunk.final:
            chunk = await stream.next()
            yield chunk
    except ClientGone:
        return
    finally:
        stream.close()


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _render(request: Request, error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(request.url.path, error, headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _render(request, error)


async def _backend_error(request: Request, error: MultiLoraError) -> JSONResponse:
    if _is_openai(request):
        return _render(request, from_backend(error, openai_api.PARAMS, getattr(request.state, "model", None)))
    return _render(request, from_backend(error, tgi_api.PARAMS))


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, naming the field (`parameters.temperature`), as a 400 / TGI's 422."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        where = f" at character {location[0]}" if location else ""
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        return _render(request, ApiError(400, f"the request body is not valid JSON: {reason}{where}", None,
                                         "invalid_json"))
    param = ".".join(location) or None
    message = f"invalid '{param}': {first.get('msg')}" if param else f"the request body: {first.get('msg')}"
    return _render(request, ApiError(400, message, param, "invalid_parameter"))


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (no such route, a method the route does not take, a body it could not
    parse) in the API's shape instead of FastAPI's `{"detail": ...}`."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{request.method} {request.url.path}: {error.detail}"
    if error.status_code == 404:
        message += " (this gateway serves /v1/models, /v1/chat/completions, /v1/completions, /generate, " \
                   "/generate_stream, /, /health and KServe v2 under /v2)"
    api_error = ApiError(error.status_code, message, None, codes.get(error.status_code, "invalid_request"))
    return _render(request, api_error, dict(error.headers or {}))


async def _client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
