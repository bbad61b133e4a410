"""Engine outputs and errors as Triton response contents (numpy tensors, error code + message)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from ..engine.logprobs import TokenLogprob
from ..engine.sequence import SequenceOutput
from ..engine.vocabulary import Vocabulary
from ..errors import UserError

NEG_INF_LOGPROB = -9999.0  # what a logprob of -inf is reported as (vLLM's convention): JSON has no infinity


def output_tensors(out: SequenceOutput, vocabulary: Vocabulary | None = None) -> dict[str, np.ndarray]:
    """The output tensors of one response, each [1, 1] (batch of one request); the counters and
    finish_reason only on the final one; `logprobs` and `prompt_logprobs` only where the request
    asked for them (rendered with `vocabulary`, see logprobs_json)."""
    tensors = {"text_output": np.array([[out.text.encode("utf-8")]], dtype=np.object_)}
    if out.finished:
        tensors["finish_reason"] = np.array([[out.finish_reason.value.encode()]], dtype=np.object_)
        tensors["prompt_tokens"] = np.array([[out.prompt_tokens]], dtype=np.int32)
        tensors["completion_tokens"] = np.array([[out.completion_tokens]], dtype=np.int32)
    for name, found in (("logprobs", out.logprobs), ("prompt_logprobs", out.prompt_logprobs)):
        if found is not None:
            if vocabulary is None:
                raise ValueError("output_tensors needs the vocabulary to render logprobs")
            tensors[name] = np.array([[logprobs_json(found, vocabulary).encode("utf-8")]], dtype=np.object_)
    return tensors


def logprobs_json(found: list[TokenLogprob], vocabulary: Vocabulary) -> str:
    """The JSON list of the `logprobs` / `prompt_logprobs` outputs, one object per token:
    `{"id", "token", "bytes", "special", "logprob", "top_logprobs": [{"id", "token", "bytes",
    "special", "logprob"}, ...]}`, alternatives most likely first; a prompt's first token has
    `logprob` and `top_logprobs` null."""
    def token(token_id: int, logprob: float | None) -> dict[str, Any]:
        vocab = vocabulary[token_id]
        return {"id": token_id, "token": vocab.text, "bytes": list(vocab.bytes), "special": vocab.special,
                "logprob": _number(logprob)}

    entries = []
    for position in found:
        entry = token(position.token_id, position.logprob)
        entry["top_logprobs"] = None if position.logprob is None else [token(i, v) for i, v in position.top]
        entries.append(entry)
    return json.dumps(entries, ensure_ascii=False, separators=(",", ":"))


def _number(logprob: float | None) -> float | None:
    if logprob is None or math.isnan(logprob):
        return None
    return max(logprob, NEG_INF_LOGPROB)


def merge_pending(items: list[Any]) -> list[Any]:
    """Items waiting to be sent, with the waiting text pieces of each stream joined into one.

    Every response is a round trip to the server process and one more message for tritonserver
    and the client; when the sender falls behind the engine, a stream's waiting pieces (and its
    final output, whose counters and finish reason it keeps) go out as one response. The joined
    text is the same, so streamed pieces still join to the non-streamed text (and their logprobs
    to the non-streamed ones; the prompt's come with the first). An error output is
    never merged: it ends its stream after the text sent before it. Other items (command answers)
    pass through in order."""
    merged: list[Any] = []
    open_stream: dict[str, int] = {}  # request id -> index in `merged` of its unsent, unfinished output
    for item in items:
        if not isinstance(item, SequenceOutput):
            merged.append(item)
            continue
        at = open_stream.pop(item.request_id, None)
        if at is not None and item.error is None:
            earlier = merged[at]
            merged[at] = dataclasses.replace(item, text=earlier.text + item.text,
                                             logprobs=_joined(earlier.logprobs, item.logprobs),
                                             prompt_logprobs=earlier.prompt_logprobs or item.prompt_logprobs)
        else:
            at = len(merged)
            merged.append(item)
        if not item.finished:
            open_stream[item.request_id] = at
    return merged


def _joined(first: list | None, second: list | None) -> list | None:
    return second if first is None else first + (second or [])


def error_code_and_message(error: Exception) -> tuple[str, str]:
    """A TritonError code name and the text the user reads; internal errors say so plainly."""
    if isinstance(error, UserError):
        return error.triton_code, str(error)
    return "INTERNAL", f"internal error while generating: {type(error).__name__}: {error}"


def json_tensors(document: dict) -> dict[str, np.ndarray]:
    """A management command's answer: a JSON document in text_output."""
    return {"text_output": np.array([[json.dumps(document, sort_keys=True).encode()]], dtype=np.object_)}
