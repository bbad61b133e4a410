"""OpenAI's chat completions, completions and models, in lora_llm's terms and back.

Pure functions over pydantic models and dicts (unit-tested without a server). `model` is the base
model's name or an adapter id. Fields OpenAI has but lora_llm cannot honour are refused by name
unless they hold their default, so a client never silently gets something else than it asked for.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..response import Chunk, Generation
from .errors import ApiError
from .logprobs import CompletionLogprobs, chat_logprobs, joined
from .triton import TritonCall

# lora_llm's finish_reason -> OpenAI's. A cancelled request only ends that way for a client that left.
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "stop"}
# lora_llm's field names in error messages -> the request's own, for `param`.
PARAMS = {"adapter_id": "model", "lora_name": "model", "text_input": "prompt"}
# Accepted only with these (default) values; None is always accepted.
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"),
    "best_of": (1,), "suffix": ("",), "modalities": (["text"],),
}
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by `check_extras`, naming each

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not OpenAI's, but lora_llm's (as vLLM's OpenAI server takes them).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    # Structured output: {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema", ...}},
    # passed on as lora_llm's response_format, which checks it (completions too, as vLLM's server).
    response_format: dict[str, Any] | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        """lora_llm's `logprobs` and `prompt_logprobs`: top alternatives per token (None: none)."""
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's legacy range

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        """lora_llm's `logprobs` and `prompt_logprobs` (echo: the prompt's tokens' too)."""
        return self.logprobs, self.logprobs if self.echo else None

    def prompt_text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError(400, "'prompt' must be one non-empty string (several prompts in one request are "
                                "not supported; send one request each)", "prompt")
        return prompts[0]


def check_extras(body: _Request) -> None:
    """Refuse fields lora_llm cannot honour (unless at their default) and fields OpenAI does not have."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED or value is None:
            continue
        if name not in DEFAULT_ONLY:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", name)
        if value not in DEFAULT_ONLY[name]:
            raise ApiError(400, f"'{name}' = {value!r} is not supported by this server "
                                f"(allowed: {', '.join(repr(v) for v in DEFAULT_ONLY[name])}, or leave it out)", name)


def triton_call(body: _Request, adapter_id: str | None, default_max_tokens: int) -> TritonCall:
    """The lora_llm request for a (chat) completion; `adapter_id` None is the base model."""
    check_extras(body)
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens
    logprobs, prompt_logprobs = body.logprobs_asked()
    sampling = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "ignore_eos": body.ignore_eos,
                "stop": [body.stop] if isinstance(body.stop, str) else body.stop or None,
                "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
                "response_format": None if body.response_format == {"type": "text"} else body.response_format}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(body, ChatCompletionRequest):
        return TritonCall(messages=body.messages, adapter_id=adapter_id, stream=body.stream, sampling=sampling)
    return TritonCall(prompt=body.prompt_text(), adapter_id=adapter_id, stream=body.stream, sampling=sampling)


# -- responses -----------------------------------------------------------------------------------
class Reply:
    """What every object of one response shares: id, model, creation time."""

    def __init__(self, body: _Request, prefix: str) -> None:
        self.body = body
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.chat = isinstance(body, ChatCompletionRequest)
        self._echo = "" if self.chat or not body.echo else body.prompt_text()
        # Completions' text offsets run over the whole choice text, which starts with the echoed prompt.
        self._offsets = CompletionLogprobs(len(self._echo))

    def _object(self, kind: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                "choices": choices, **extra}

    def whole(self, generation: Generation) -> dict[str, Any]:
        """The non-streamed answer."""
        finish = FINISH_REASONS.get(generation.finish_reason or "", "stop")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                      "logprobs": self._logprobs(generation.logprobs), "finish_reason": finish}
            return self._object("chat.completion", [choice], usage=usage(generation))
        logprobs = self._logprobs(generation.logprobs)
        if logprobs is not None and generation.prompt_logprobs is not None:  # echo: the prompt's come first
            logprobs = joined(CompletionLogprobs().of(generation.prompt_logprobs), logprobs)
        choice = {"index": 0, "text": self._echo + generation.text, "logprobs": logprobs, "finish_reason": finish}
        return self._object("text_completion", [choice], usage=usage(generation))

    def chunks(self, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        """The stream objects for one lora_llm response (the first opens the message, the final one
        also carries finish_reason and, when asked for, a last object with the usage)."""
        out = []
        if first and self.chat:
            out.append(self._chunk({"role": "assistant", "content": ""}, None))
        if first and self._echo:
            prompt = chunk.prompt_logprobs
            out.append(self._chunk(self._echo, None, None if prompt is None else CompletionLogprobs().of(prompt)))
        logprobs = self._logprobs(chunk.logprobs)  # the tokens of this response go with its text
        if chunk.text or (logprobs is not None and not chunk.final):
            out.append(self._chunk({"content": chunk.text} if self.chat else chunk.text, None, logprobs))
            logprobs = None
        if chunk.final:
            finish = FINISH_REASONS.get(chunk.finish_reason or "", "stop")
            out.append(self._chunk({} if self.chat else "", finish, logprobs))
            if self.body.include_usage():
                out.append(self._object(self._chunk_kind, [], usage=usage(chunk)))
        return out

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _logprobs(self, tokens: list | None) -> dict[str, Any] | None:
        """A choice's `logprobs` for these generated tokens (None when the request asked for none)."""
        if tokens is None:
            return None
        return chat_logprobs(tokens) if self.chat else self._offsets.of(tokens)

    def _chunk(self, content: dict | str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        choice.update({"delta": content} if self.chat else {"text": content})
        extra = {"usage": None} if self.body.include_usage() else {}
        return self._object(self._chunk_kind, [choice], **extra)


def usage(final: Generation | Chunk) -> dict[str, int]:
    prompt, completion = final.prompt_tokens or 0, final.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_list(base_name: str, adapter_ids: list[str], created: int) -> dict[str, Any]:
    """GET /v1/models: the base model, then each adapter with the base as its parent."""
    models = [model_card(base_name, None, created)] + [model_card(a, base_name, created) for a in adapter_ids]
    return {"object": "list", "data": models}


def model_card(model_id: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "multilora",
            "root": parent or model_id, "parent": parent}


def error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
