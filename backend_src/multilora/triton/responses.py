"""Engine outputs and errors as Triton response contents (numpy tensors, error code + message)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from ..engine.sequence import SequenceOutput
from ..errors import UserError


def output_tensors(out: SequenceOutput) -> dict[str, np.ndarray]:
    """The output tensors of one response, each [1, 1] (batch of one request); the counters and
    finish_reason only on the final one."""
    tensors = {"text_output": np.array([[out.text.encode("utf-8")]], dtype=np.object_)}
    if out.finished:
        tensors["finish_reason"] = np.array([[out.finish_reason.value.encode()]], dtype=np.object_)
        tensors["prompt_tokens"] = np.array([[out.prompt_tokens]], dtype=np.int32)
        tensors["completion_tokens"] = np.array([[out.completion_tokens]], dtype=np.int32)
    return tensors


def merge_pending(items: list[Any]) -> list[Any]:
    """Items waiting to be sent, with the waiting text pieces of each stream joined into one.

    Every response is a round trip to the server process and one more message for tritonserver
    and the client; when the sender falls behind the engine, a stream's waiting pieces (and its
    final output, whose counters and finish reason it keeps) go out as one response. The joined
    text is the same, so streamed pieces still join to the non-streamed text. An error output is
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
            merged[at] = dataclasses.replace(item, text=merged[at].text + item.text)
        else:
            at = len(merged)
            merged.append(item)
        if not item.finished:
            open_stream[item.request_id] = at
    return merged


def error_code_and_message(error: Exception) -> tuple[str, str]:
    """A TritonError code name and the text the user reads; internal errors say so plainly."""
    if isinstance(error, UserError):
        return error.triton_code, str(error)
    return "INTERNAL", f"internal error while generating: {type(error).__name__}: {error}"


def json_tensors(document: dict) -> dict[str, np.ndarray]:
    """A management command's answer: a JSON document in text_output."""
    return {"text_output": np.array([[json.dumps(document, sort_keys=True).encode()]], dtype=np.object_)}
