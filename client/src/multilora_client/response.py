"""Server responses as plain values: a `Chunk` per response, a `Generation` per request.

Both transports (gRPC tensors, HTTP JSON) are reduced to `Chunk`s here, so the sync and async
clients share one way of deciding what text a response holds and whether it was the last one.
"""
from __future__ import annotations

import dataclasses
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
    its tokens where the request asked for them (`logprobs=k`, `prompt_logprobs=k`). With `n` > 1,
    `choices` holds every choice's answer by index, and the fields are those of the first."""

    text: str
    finish_reason: str | None  # length | stop | eos | cancelled
    prompt_tokens: int | None
    completion_tokens: int | None
    logprobs: list[TokenLogprob] | None = None  # one per generated token
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token; the first's logprob is None
    choices: tuple[Generation, ...] = ()

    @classmethod
    def of(cls, chunks: list[Chunk]) -> Generation:
        """A request's chunks joined (texts, logprobs) per choice, with the counters of each
        choice's last chunk; the prompt's logprobs come with whichever chunk carried them."""
        prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
        by_index: dict[int, list[Chunk]] = {}
        for chunk in chunks:
            by_index.setdefault(chunk.index, []).append(chunk)
        choices = tuple(cls._choice(by_index[i], prompt) for i in sorted(by_index))
        return choices[0] if len(choices) == 1 else dataclasses.replace(choices[0], choices=choices)

    @classmethod
    def _choice(cls, chunks: list[Chunk], prompt: list[TokenLogprob] | None) -> Generation:
        last = chunks[-1]
        asked = [c.logprobs for c in chunks if c.logprobs is not None]
        return cls("".join(c.text for c in chunks), last.finish_reason, last.prompt_tokens,
                   last.completion_tokens, [t for found in asked for t in found] if asked else None, prompt)


@dataclass(frozen=True)
class Chunk:
    """One choice's part of a response: new text (stream) or the whole text; the counters where
    the choice ends; the logprobs of its tokens (and, on the request's first, the prompt's) where
    the request asked. `final`: the request's last (with `n` > 1, choices end before it)."""

    text: str
    final: bool
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which choice (n > 1)


@dataclass(frozen=True)
class Adapters:
    """Where each adapter is: on disk only, cached in host memory, or loaded on the device."""

    disk: list[str]
    host: list[str]
    device: list[str]


_OUTPUTS = ("text_output", "index", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs",
            "prompt_logprobs")


def chunks_from_grpc(result: Any) -> list[Chunk]:
    """A `tritonclient.grpc.InferResult` as Chunks: one per choice it carries (several in the one
    response of a non-streamed request with n > 1). The final response is flagged by Triton
    (`triton_final_response`, asked for with enable_empty_final_response), so an empty final
    response is handled too; without the flag, finish_reason marks the end (n = 1)."""
    params = result.get_response().parameters
    flag = params["triton_final_response"].bool_param if "triton_final_response" in params else None
    return _chunks({name: _values(result.as_numpy(name)) for name in _OUTPUTS}, flag)


def chunks_from_json(event: dict[str, Any], final: bool | None) -> list[Chunk]:
    """A /generate body (`final`: True) or one /generate_stream event (None: see chunks_from_grpc)
    as Chunks, one per choice it carries; raises the mapped error if it is one."""
    if "error" in event:
        raise map_error(str(event["error"]))
    return _chunks({name: _listed(event.get(name)) for name in _OUTPUTS}, final)


class SseChunks:
    """/generate_stream's events as Chunks. No event says it is the request's last: the request
    ends with its last choice's end (`choices`: the request's n)."""

    def __init__(self, choices: int = 1) -> None:
        self.running = choices

    def chunk(self, line: bytes | str) -> Chunk | None:
        """One line's Chunk (a streamed response carries one choice); None for lines without an event."""
        event = sse_data(line)
        if event is None:
            return None
        (chunk,) = chunks_from_json(event, final=False)
        self.running -= chunk.finish_reason is not None
        return dataclasses.replace(chunk, final=self.running <= 0)


def _chunks(values: dict[str, list[Any]], final: bool | None) -> list[Chunk]:
    texts = values["text_output"] or [""]

    def at(name: str, i: int) -> Any:
        found = values[name]
        return found[i] if i < len(found) else None

    prompt = _logprobs(at("prompt_logprobs", 0))
    chunks = [Chunk(text=str(text), final=False, finish_reason=at("finish_reason", i) or None,
                    prompt_tokens=_opt_int(at("prompt_tokens", i)),
                    completion_tokens=_opt_int(at("completion_tokens", i)), logprobs=_logprobs(at("logprobs", i)),
                    prompt_logprobs=prompt if i == 0 else None, index=_opt_int(at("index", i)) or 0)
              for i, text in enumerate(texts)]
    ends = final if final is not None else bool(chunks[-1].finish_reason)
    chunks[-1] = dataclasses.replace(chunks[-1], final=ends)
    return chunks


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


def _values(array: Any) -> list[Any]:
    """An output tensor's values in order (text as str); none for a missing output."""
    if array is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
            for v in array.reshape(-1)]


def _listed(value: Any) -> list[Any]:
    """A /generate JSON output: a value per choice ([1, n] tensors are JSON lists)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
