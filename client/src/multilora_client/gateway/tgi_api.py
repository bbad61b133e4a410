"""Text Generation Inference's /generate, /generate_stream and / (its compatibility route), in
lora_llm's terms and back.

Pure functions over pydantic models and dicts. The payload is TGI's (`inputs`, `parameters` with
`adapter_id`, `max_new_tokens`, ...), so a TGI request works unchanged with only host and port
changed. Token ids and logprobs cost a little, so lora_llm computes them only when asked: with
`details` (or `top_n_tokens`) a stream has one event per token, with its id, text, logprob and
`special`, and `details` list every token; otherwise a stream has one event per piece of text,
whose token `id` is 0 and `logprob` null. `best_of` asks lora_llm for that many choices (`n`) with
their logprobs, and answers with the one of the highest mean logprob per token, as TGI.
"""
from __future__ import annotations

import json
import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..response import Chunk, Generation
from .errors import ApiError
from .logprobs import tgi_prefill, tgi_token, tgi_top_tokens
from .triton import TritonCall

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence", "cancelled": "stop_sequence"}
PARAMS = {"text_input": "inputs", "max_tokens": "max_new_tokens", "response_format": "grammar"}
# TGI parameters lora_llm cannot honour: accepted at these values (None too), refused by name otherwise.
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "truncate": (), "typical_p": (1, 1.0), "watermark": (False,),
}
# TGI's validation errors are 422, every other status is the one the APIs share.
VALIDATION_STATUSES = (400,)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # TGI ignores unknown parameters; see check_parameters

    adapter_id: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = False
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | None = Field(None, max_length=4)
    return_full_text: bool | None = False
    details: bool | None = False
    decoder_input_details: bool | None = False  # the prompt's tokens and logprobs in details.prefill
    top_n_tokens: int | None = Field(None, ge=0, le=5)  # TGI's default --max-top-n-tokens
    best_of: int | None = Field(None, ge=1)  # lora_llm's n says how many it allows (max_num_seqs, 16)
    grammar: dict[str, Any] | None = None  # {"type": "json", "value": schema} or {"type": "regex", "value": ...}


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # only read by POST /


def check_parameters(parameters: Parameters) -> None:
    for name in DEFAULT_ONLY:
        value = (parameters.model_extra or {}).get(name)
        if value is not None and value not in DEFAULT_ONLY[name]:
            raise ApiError(400, f"parameter '{name}' = {value!r} is not supported by this server; leave it out", name)


def triton_call(body: GenerateRequest, stream: bool, default_max_tokens: int) -> tuple[TritonCall, int | None]:
    """The lora_llm request, and the seed reported in `details` (None when decoding greedily).

    As TGI: sampling when `do_sample`, or when temperature, top_k or top_p change the distribution;
    greedy otherwise. A sampled request without a seed gets a random one, so it can be reported.
    """
    p = body.parameters
    check_parameters(p)
    if p.decoder_input_details and stream:
        raise ApiError(400, "decoder_input_details == true is not supported when streaming tokens",
                       "decoder_input_details")
    sampling: dict[str, Any] = {"max_tokens": p.max_new_tokens or default_max_tokens}
    if p.details or (stream and p.top_n_tokens):  # where the answer shows tokens: see the module docstring
        sampling["logprobs"] = p.top_n_tokens or 0
    if p.details and p.decoder_input_details:
        sampling["prompt_logprobs"] = 0
    sample = bool(p.do_sample or (p.temperature not in (None, 1.0)) or p.top_k or (p.top_p not in (None, 1.0)))
    if (p.best_of or 1) > 1:  # as TGI: sampled, not streamed; the logprobs rank the choices
        if stream:
            raise ApiError(400, "`best_of` != 1 is not supported when streaming tokens", "best_of")
        if not sample:
            raise ApiError(400, "you must use sampling when `best_of` is > 1", "best_of")
        sampling.update(n=p.best_of, logprobs=p.top_n_tokens or 0)
    seed = None
    if sample:
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        sampling.update(temperature=p.temperature or 1.0, seed=seed, top_p=p.top_p, top_k=p.top_k)
    sampling.update(repetition_penalty=p.repetition_penalty, stop=p.stop or None, response_format=_grammar(p.grammar))
    sampling = {k: v for k, v in sampling.items() if v is not None}
    return TritonCall(prompt=body.inputs, adapter_id=p.adapter_id or None, stream=stream, sampling=sampling), seed


def _grammar(grammar: dict[str, Any] | None) -> dict[str, Any] | None:
    """TGI's grammar as lora_llm's response_format; the schema or regex itself is lora_llm's to judge."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if set(grammar) - {"type", "value"} or kind not in ("json", "regex"):
        raise ApiError(400, f"parameter 'grammar' must be {{\"type\": \"json\" or \"regex\", \"value\": ...}}, "
                            f"got {grammar!r:.200}", "grammar")
    if kind == "regex":
        return {"type": "regex", "value": value}
    if isinstance(value, str):  # TGI takes the schema as an object or as its JSON text
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ApiError(400, f"parameter 'grammar': the JSON schema text is not JSON ({exc})", "grammar") from None
    return {"type": "json_schema", "json_schema": {"schema": value}}


def response(body: GenerateRequest, generation: Generation, seed: int | None) -> dict[str, Any]:
    """POST /generate's answer; with `best_of`, the best choice's, the others in
    `details.best_of_sequences` (each with the request's seed: lora_llm derives each choice's own
    from it)."""
    choices = generation.choices or (generation,)
    best = max(choices, key=_mean_logprob)
    out: dict[str, Any] = {"generated_text": _full_text(body, best.text)}
    if body.parameters.details:
        out["details"] = _details(body, best, generation.prompt_logprobs, seed)
        if len(choices) > 1:
            out["details"]["best_of_sequences"] = [
                {"generated_text": _full_text(body, c.text), **_details(body, c, generation.prompt_logprobs, seed)}
                for c in choices if c is not best]
    return out


def _details(body: GenerateRequest, generation: Generation, prompt: list | None, seed: int | None) -> dict[str, Any]:
    tokens = generation.logprobs or []
    details = {"finish_reason": _finish(generation.finish_reason),
               "generated_tokens": generation.completion_tokens or 0, "seed": seed,
               "prefill": [tgi_prefill(t) for t in prompt or []], "tokens": [tgi_token(t) for t in tokens]}
    if body.parameters.top_n_tokens:
        details["top_tokens"] = [tgi_top_tokens(t) for t in tokens]
    return details


def _mean_logprob(generation: Generation) -> float:
    """What TGI ranks best_of's sequences by: the mean logprob of their generated tokens."""
    logprobs = [t["logprob"] for t in generation.logprobs or []]
    if not logprobs or None in logprobs:
        return -math.inf
    return sum(logprobs) / len(logprobs)


def stream_events(body: GenerateRequest, chunk: Chunk, index: int, text_so_far: str, seed: int | None) -> list[dict]:
    """The server-sent events of one lora_llm response: one per token where the request asked for
    tokens (details or top_n_tokens), else one per piece of text (none for an empty non-final one);
    the final response's last event also carries the whole generated text and, when asked for,
    the details."""
    if chunk.logprobs:
        events = [_event(index + i, tgi_token(t), tgi_top_tokens(t) if body.parameters.top_n_tokens else None)
                  for i, t in enumerate(chunk.logprobs)]
    elif chunk.text or chunk.final:
        events = [_event(index, {"id": 0, "text": chunk.text, "logprob": None, "special": False}, None)]
    else:
        return []
    if chunk.final:
        events[-1]["generated_text"] = _full_text(body, text_so_far)
        if body.parameters.details:
            events[-1]["details"] = {"finish_reason": _finish(chunk.finish_reason),
                                     "generated_tokens": chunk.completion_tokens or 0,
                                     "input_length": chunk.prompt_tokens or 0, "seed": seed}
    return events


def _event(index: int, token: dict[str, Any], top_tokens: list[dict[str, Any]] | None) -> dict[str, Any]:
    event = {"index": index, "token": token, "generated_text": None, "details": None}
    if top_tokens is not None:
        event["top_tokens"] = top_tokens
    return event


def error_body(error: ApiError) -> dict[str, Any]:
    """TGI's error shape; `error_type` is what huggingface_hub turns into its exception types."""
    kind = {400: "validation", 404: "validation", 405: "validation", 413: "validation", 503: "unhealthy",
            504: "timeout"}.get(error.status, "generation")
    return {"error": error.message, "error_type": kind}


def status(error: ApiError) -> int:
    """TGI answers input validation errors with 422 and failed generations with 424."""
    if error.status in VALIDATION_STATUSES:
        return 422
    return 424 if error.status == 500 else error.status


def _full_text(body: GenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def _finish(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", "length")
