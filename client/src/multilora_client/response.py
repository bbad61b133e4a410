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


# A token's logprob as lora_llm sends it (docs/api.md, "Logprobs"): {"id", "token", "bytes", "special",
# "logprob", "top_logprobs": [{"id", "token", "bytes", "special", "logprob"}, ...]}.
TokenLogprob = dict[str, Any]


@dataclass(frozen=True)
class Generation:
    """The whole answer to one request, with the server's own token counts, and the logprobs of
    its tokens where the request asked for them (`logprobs=k`, `prompt_logprobs=k`)."""

    text: str
    finish_reason: str | None  # length | stop | eos | cancelled
    prompt_tokens: int | None
    completion_tokens: int | None
    logprobs: list[TokenLogprob] | None = None  # one per generated token
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token; the first's logprob is None

    @classmethod
    def of(cls, chunks: list["Chunk"]) -> "Generation":
        """A request's chunks joined (texts, logprobs), with the counters of the last (final) one."""
        final = chunks[-1]
        asked = [c.logprobs for c in chunks if c.logprobs is not None]
        prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
        return cls("".join(c.text for c in chunks), final.finish_reason, final.prompt_tokens,
                   final.completion_tokens, [t for found in asked for t in found] if asked else None, prompt)


@dataclass(frozen=True)
class Chunk:
    """One response: new text (stream) or the whole text; the counters only when `final`; the
    logprobs of its tokens (and, on the first, the prompt's) where the request asked."""

    text: str
    final: bool
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


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
        logprobs=_logprobs(_first(result.as_numpy("logprobs"))),
        prompt_logprobs=_logprobs(_first(result.as_numpy("prompt_logprobs"))),
    )


def chunk_from_json(event: dict[str, Any], final: bool) -> Chunk:
    """A /generate body or one /generate_stream event; raises the mapped error if it is one."""
    if "error" in event:
        raise map_error(str(event["error"]))
    finish = event.get("finish_reason") or None
    return Chunk(text=str(event.get("text_output", "")), final=final or bool(finish), finish_reason=finish,
                 prompt_tokens=_opt_int(event.get("prompt_tokens")),
                 completion_tokens=_opt_int(event.get("completion_tokens")),
                 logprobs=_logprobs(event.get("logprobs")), prompt_logprobs=_logprobs(event.get("prompt_logprobs")))


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
    seen: list[Chunk] = []
    for chunk in chunks:
        seen.append(chunk)
        if chunk.final:
            return Generation.of(seen)
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


def _logprobs(text: str | None) -> list[TokenLogprob] | None:
    """A `logprobs` / `prompt_logprobs` output (JSON text), or None where the response has none."""
    if text is None:
        return None
    try:
        found = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MultiLoraError(f"the server sent logprobs that are not JSON: {text[:200]!r}") from exc
    if not isinstance(found, list):
        raise MultiLoraError(f"the server sent logprobs as {type(found).__name__}, not a list")
    return found


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
