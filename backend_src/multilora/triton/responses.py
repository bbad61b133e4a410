"""Engine outputs and errors as Triton response contents (numpy tensors, error code + message)."""
from __future__ import annotations

import json

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


def error_code_and_message(error: Exception) -> tuple[str, str]:
    """A TritonError code name and the text the user reads; internal errors say so plainly."""
    if isinstance(error, UserError):
        return error.triton_code, str(error)
    return "INTERNAL", f"internal error while generating: {type(error).__name__}: {error}"


def json_tensors(document: dict) -> dict[str, np.ndarray]:
    """A management command's answer: a JSON document in text_output."""
    return {"text_output": np.array([[json.dumps(document, sort_keys=True).encode()]], dtype=np.object_)}
