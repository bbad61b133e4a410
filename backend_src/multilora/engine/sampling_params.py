"""Sampling parameters of one request, validated where they enter the engine.

`LIMITS` is the one place for the allowed ranges: the request parser, docs/api.md and the error
messages all take them from here. A value outside its range, or one that cannot be computed with
(NaN, infinity, a repetition penalty so small that dividing by it overflows), is refused here, by
name, before any row is sampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InvalidParameterError
from .response_format import ResponseFormat

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's top_logprobs, vLLM's default max_logprobs)
MAX_CHOICES = 16  # n at most: each choice is a running row (max_num_seqs) and its own KV blocks


@dataclass(frozen=True)
class Limit:
    """A closed range [low, high] (open at `low` when `low_open`) of integers or finite numbers."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    note: str = ""  # what special values mean, e.g. "0 = greedy"

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"
        return f"{kind} in {bounds}" + (f" ({self.note})" if self.note else "")

    def check(self, name: str, value: object) -> None:
        if self.integer:
            fits = isinstance(value, int) and not isinstance(value, bool)
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if fits:
            fits = (self.low < value if self.low_open else self.low <= value) and value <= self.high
        if not fits:
            raise InvalidParameterError(name, f"must be {self.describe()}, got {value!r}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


LIMITS: dict[str, Limit] = {
    "max_tokens": Limit(1, 1_000_000, integer=True),
    "temperature": Limit(0.0, 100.0, note="0 = greedy"),
    "top_p": Limit(0.0, 1.0, low_open=True),
    "top_k": Limit(-1, 1_000_000, integer=True, note="0 or -1 = off"),
    # Below 0.01, dividing a logit by the penalty can overflow float32 (issue 10, item 1).
    "repetition_penalty": Limit(0.01, 10.0, note="1 = off"),
    "seed": Limit(0, 2**64 - 1, integer=True),
    "logprobs": Limit(0, MAX_LOGPROBS, integer=True, note="0 = the chosen token only"),
    "prompt_logprobs": Limit(0, MAX_LOGPROBS, integer=True, note="0 = the chosen token only"),
    "n": Limit(1, MAX_CHOICES, integer=True),
}
OPTIONAL = ("seed", "logprobs", "prompt_logprobs")  # None: not asked (seed: a random one)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # Log-probabilities (engine/logprobs.py): of each generated token with this many top
    # alternatives, and of each prompt token (the first has none); None: not computed at all.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Choices: n completions of the prompt, computed once and sampled n times (engine/sequence.py,
    # SequenceGroup). With a seed, choice i samples with a seed derived from (seed, i); greedy
    # choices are identical, as vLLM's and OpenAI's.
    n: int = 1
    # Structured output: the text follows this JSON schema / object / regex (engine/grammar.py);
    # a dict is read as a request's response_format object.
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)  # vLLM's spelling of "off"
        if isinstance(self.response_format, dict):
            object.__setattr__(self, "response_format", ResponseFormat.parse(self.response_format))
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                limit.check(name, value)
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidParameterError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")
