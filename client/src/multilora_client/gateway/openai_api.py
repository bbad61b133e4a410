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
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
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
    n: int | None = Field(None, ge=1)  # choices; lora_llm says how many it allows (max_num_seqs, 16)
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
                "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "n": body.n if body.n != 1 else None,
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
        self.n = body.n or 1
        self._echo = "" if self.chat or not body.echo else body.prompt_text()
        # Completions' text offsets run over each choice's whole text, which starts with the echoed prompt.
        self._offsets = [CompletionLogprobs(len(self._echo)) for _ in range(self.n)]
        self._completion_tokens = 0  # a stream's, over the choices that ended

    def _object(self, kind: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                "choices": choices, **extra}

    def whole(self, generation: Generation) -> dict[str, Any]:
        """The non-streamed answer: one choice per lora_llm choice (`n`), the usage over all of them."""
        choices = generation.choices or (generation,)
        total = usage(generation.prompt_tokens, sum(c.completion_tokens or 0 for c in choices))
        if self.chat:
            return self._object("chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": self._logprobs(c.logprobs, i), "finish_reason": _finish(c.finish_reason)}
                for i, c in enumerate(choices)], usage=total)
        answers = []
        for i, c in enumerate(choices):
            logprobs = self._logprobs(c.logprobs, i)
            if logprobs is not None and generation.prompt_logprobs is not None:  # echo: the prompt's come first
                logprobs = joined(CompletionLogprobs().of(generation.prompt_logprobs), logprobs)
            answers.append({"index": i, "text": self._echo + c.text, "logprobs": logprobs,
                            "finish_reason": _finish(c.finish_reason)})
        return self._object("text_completion", answers, usage=total)

    def chunks(self, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        """The stream objects for one lora_llm response, which carries one choice's text (the
        first response opens every choice's message; the one that ends a choice also carries its
        finish_reason; the final one, when asked for, a last object with the usage)."""
        out = []
        for i in range(self.n) if first else ():
            if self.chat:
                out.append(self._chunk(i, {"role": "assistant", "content": ""}, None))
            if self._echo:
                prompt = None if chunk.prompt_logprobs is None else CompletionLogprobs().of(chunk.prompt_logprobs)
                out.append(self._chunk(i, self._echo, None, prompt))
        ends = chunk.finish_reason is not None or chunk.final
        logprobs = self._logprobs(chunk.logprobs, chunk.index)  # the tokens of this response go with its text
        if chunk.text or (logprobs is not None and not ends):
            out.append(self._chunk(chunk.index, {"content": chunk.text} if self.chat else chunk.text, None, logprobs))
            logprobs = None
        if ends:
            out.append(self._chunk(chunk.index, {} if self.chat else "", _finish(chunk.finish_reason), logprobs))
            self._completion_tokens += chunk.completion_tokens or 0
        if chunk.final and self.body.include_usage():
            out.append(self._object(self._chunk_kind, [], usage=usage(chunk.prompt_tokens, self._completion_tokens)))
        return out

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _logprobs(self, tokens: list | None, index: int) -> dict[str, Any] | None:
        """Choice `index`'s `logprobs` for these generated tokens (None when the request asked for none)."""
        if tokens is None:
            return None
        return chat_logprobs(tokens) if self.chat else self._offsets[index].of(tokens)

    def _chunk(self, index: int, content: dict | str, finish: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        choice.update({"delta": content} if self.chat else {"text": content})
        extra = {"usage": None} if self.body.include_usage() else {}
        return self._object(self._chunk_kind, [choice], **extra)


def usage(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage: the prompt once, the completion tokens of every choice."""
    prompt = prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def _finish(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", "stop")


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
