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
    """The output tensors of one response (a batch of one request): one value per choice it
    carries, [1, 1], or [1, n] for the one response of a non-streamed request with n > 1
    (`out.choices`), with each choice's `index`; finish_reason and the counters only where the
    choices end; `logprobs` and `prompt_logprobs` ([1, 1]: the request's) only where the request
    asked for them (rendered with `vocabulary`, see logprobs_json)."""
    choices = out.choices or (out,)

    def row(values: list[Any], dtype: type) -> np.ndarray:
        return np.array([values], dtype=dtype)

    tensors = {"text_output": row([c.text.encode("utf-8") for c in choices], np.object_),
               "index": row([c.index for c in choices], np.int32)}
    if choices[0].finish_reason is not None:
        tensors["finish_reason"] = row([c.finish_reason.value.encode() for c in choices], np.object_)
        tensors["prompt_tokens"] = row([c.prompt_tokens for c in choices], np.int32)
        tensors["completion_tokens"] = row([c.completion_tokens for c in choices], np.int32)
    asked = [("logprobs", [c.logprobs for c in choices]), ("prompt_logprobs", [out.prompt_logprobs])]
    for name, found in asked:
        if found[0] is not None:
            if vocabulary is None:
                raise ValueError("output_tensors needs the vocabulary to render logprobs")
            tensors[name] = row([logprobs_json(f or [], vocabulary).encode("utf-8") for f in found], np.object_)
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
    to the non-streamed ones; the prompt's come with the first). The choices of a request with
    n > 1 are streams of their own, and a request's final output stays after all its others. An
    error output is never merged: it ends its stream after the text sent before it. Other items
    (command answers) pass through in order."""
    merged: list[Any] = []
    open_stream: dict[tuple[str, int], int] = {}  # (request id, choice) -> index in `merged` of its unsent output
    latest: dict[str, int] = {}  # request id -> index in `merged` of its latest output
    for item in items:
        if not isinstance(item, SequenceOutput):
            merged.append(item)
            continue
        stream = (item.request_id, item.index)
        at = open_stream.pop(stream, None)
        if at is not None and item.error is None and not (item.finished and at != latest[item.request_id]):
            earlier = merged[at]
            merged[at] = dataclasses.replace(item, text=earlier.text + item.text,
                                             logprobs=_joined(earlier.logprobs, item.logprobs),
                                             prompt_logprobs=earlier.prompt_logprobs or item.prompt_logprobs)
        else:
            at = len(merged)
            merged.append(item)
        if item.finish_reason is None:
            open_stream[stream] = at
        latest[item.request_id] = max(at, latest.get(item.request_id, at))
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
