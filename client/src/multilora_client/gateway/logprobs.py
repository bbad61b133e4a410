"""lora_llm's token logprobs in each API's shape.

lora_llm sends one object per token (docs/api.md, "Logprobs"): `{"id", "token", "bytes",
"special", "logprob", "top_logprobs": [...]}`, the model's raw distribution; a prompt's first
token has `logprob` and `top_logprobs` null. Pure functions over those objects.
"""
from __future__ import annotations

from typing import Any

from ..response import TokenLogprob


# -- OpenAI chat: choices[].logprobs.content[] ------------------------------------------------------
def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`."""
    return {"content": [dict(_chat_token(t), top_logprobs=[_chat_token(a) for a in t["top_logprobs"]])
                        for t in tokens]}


def _chat_token(token: TokenLogprob) -> dict[str, Any]:
    return {"token": token["token"], "logprob": token["logprob"], "bytes": token["bytes"]}


# -- OpenAI completions: choices[].logprobs ----------------------------------------------------------
class CompletionLogprobs:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` for one choice, built over one
    or several responses (a stream) so text offsets run on: each token's offset is the number of
    characters of the choice's text before it (special tokens, which the text leaves out, take none)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def of(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in tokens:
            out["tokens"].append(token["token"])
            out["token_logprobs"].append(token["logprob"])
            out["top_logprobs"].append(_top_dict(token))
            out["text_offset"].append(self.offset)
            self.offset += 0 if token["special"] else len(token["token"])
        return out


def joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two completions logprobs objects, one after the other (echo: the prompt's, then the answer's)."""
    return {key: first[key] + second[key] for key in first}


def _top_dict(token: TokenLogprob) -> dict[str, float] | None:
    """The alternatives by text, and the chosen token too (as OpenAI's legacy API: up to k + 1)."""
    if token["top_logprobs"] is None:  # a prompt's first token
        return None
    top = {alternative["token"]: alternative["logprob"] for alternative in token["top_logprobs"]}
    top.setdefault(token["token"], token["logprob"])
    return top


# -- TGI: details.tokens[], details.top_tokens[][], details.prefill[], stream token events -------------
def tgi_token(token: TokenLogprob) -> dict[str, Any]:
    return {"id": token["id"], "text": token["token"], "logprob": token["logprob"], "special": token["special"]}


def tgi_top_tokens(token: TokenLogprob) -> list[dict[str, Any]]:
    return [tgi_token(alternative) for alternative in token["top_logprobs"] or []]


def tgi_prefill(token: TokenLogprob) -> dict[str, Any]:
    return {"id": token["id"], "text": token["token"], "logprob": token["logprob"]}
