"""Server responses as plain values: a `Chunk` per response, a `Generation` per request.

Both transports (gRPC tensors, HTTP JSON) are reduced to `Chunk`s here, so the sync and async
clients share one way of deciding what text a response holds and whether it was the last one.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import MultiLoraError, map_error


@dataclass(frozen=True)
class Generation:
    """The whole answer to one request, with the server's own token counts."""

    text: str
    finish_reason: str | None  # length | stop | eos | cancelled
    prompt_tokens: int | None
    completion_tokens: int | None

    @classmethod
    def of(cls, pieces: list[str], final: "Chunk") -> "Generation":
        """The request's texts so far joined, with the counters of its final chunk."""
        return cls("".join(pieces), final.finish_reason, final.prompt_tokens, final.completion_tokens)


@dataclass(frozen=True)
class Chunk:
    """One response: new text (stream) or the whole text; the counters only when `final`."""

    text: str
    final: bool
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Adapters:
    """Where each adapter is: on disk only, cached in host memory, or loaded on the device."""

    disk: list[str]
    host: list[str]
    device: list[str]


def chunk_from_grpc(result: Any) -> Chunk:
    """A `tritonclient.grpc.InferResult` as a Chunk. The final response is flagged by Triton
    (`triton_final_response`, asked for with enable_empty_final_response) and, from our model,
    carries finish_reason; either marks the end, so an empty final response is handled too."""
    text = _first(result.as_numpy("text_output"))
    finish = _first(result.as_numpy("finish_reason"))
    params = result.get_response().parameters
    final = ("triton_final_response" in params and params["triton_final_response"].bool_param) or bool(finish)
    return Chunk(
        text=text or "", final=final, finish_reason=finish or None,
        prompt_tokens=_int(result.as_numpy("prompt_tokens")),
        completion_tokens=_int(result.as_numpy("completion_tokens")),
    )


def chunk_from_json(event: dict[str, Any], final: bool) -> Chunk:
    """A /generate body or one /generate_stream event; raises the mapped error if it is one."""
    if "error" in event:
        raise map_error(str(event["error"]))
    finish = event.get("finish_reason") or None
    return Chunk(text=str(event.get("text_output", "")), final=final or bool(finish), finish_reason=finish,
                 prompt_tokens=_opt_int(event.get("prompt_tokens")),
                 completion_tokens=_opt_int(event.get("completion_tokens")))


def sse_chunk(line: bytes | str) -> Chunk | None:
    """One line of /generate_stream as a Chunk; None for lines that carry no event."""
    event = sse_data(line)
    return None if event is None else chunk_from_json(event, final=False)


def sse_data(line: bytes | str) -> dict[str, Any] | None:
    """The JSON of one `data: {...}` line of a server-sent event stream; None for other lines."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    try:
        return json.loads(line[len("data:"):].strip())
    except json.JSONDecodeError as exc:
        raise MultiLoraError(f"malformed server-sent event {line[:200]!r}: {exc}") from None


def http_error_message(body: bytes | str) -> str:
    """Triton puts `{"error": "..."}` in HTTP error bodies (as an SSE `data:` line from
    /generate_stream); fall back to the raw text."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    body = body.strip()
    if body.startswith("data:"):
        body = body.splitlines()[0][len("data:"):]
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()
    return str(parsed.get("error", body)) if isinstance(parsed, dict) else body.strip()


def collect(chunks: Iterable[Chunk]) -> Generation:
    """Join the chunks of one request into its Generation (one chunk when not streaming)."""
    pieces: list[str] = []
    for chunk in chunks:
        pieces.append(chunk.text)
        if chunk.final:
            return Generation.of(pieces, chunk)
    raise MultiLoraError("the server closed the stream before the final response")


def parse_adapters(text: str) -> Adapters:
    data = _json_object(text)
    return Adapters(disk=list(data.get("disk", [])), host=list(data.get("host", [])),
                    device=list(data.get("device", [])))


def parse_command_result(text: str) -> dict[str, Any]:
    return _json_object(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MultiLoraError(f"the server answered the adapter command with non-JSON text {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise MultiLoraError(f"the server answered the adapter command with {type(data).__name__}, not an object")
    return data


def _first(array: Any) -> str | None:
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _int(array: Any) -> int | None:
    if array is None or array.size == 0:
        return None
    return int(array.reshape(-1)[0])


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
