"""A request's state as it travels from parsing through the scheduler to its final response."""
from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .detokenizer import TextStream
from .logprobs import TokenLogprob
from .sampler import splitmix64
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .grammar import Grammar


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class GenerationRequest:
    """What a client asked for, already validated (see multilora.triton.request_parsing)."""

    request_id: str
    prompt: str
    params: SamplingParams
    adapter_id: str | None = None
    stream: bool = False
    exclude_input_in_output: bool = True
    messages: list[dict] | None = None
    """A chat ({"role", "content"} dicts) to render with the chat template; `prompt` is then empty."""


@dataclass
class SequenceOutput:
    """One response's worth: a text piece, and on the last one why it ended. Where the request
    asked for them, the logprobs of the tokens generated since the previous output (all of them
    when not streaming) and, on its first output, those of the prompt."""

    request_id: str
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic time of each token (final only)
    arrival_time: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which of the request's choices (SamplingParams.n) this output belongs to
    # With n > 1, the output that ends a choice has its finish_reason and completion_tokens, and
    # `finished` is set on the last choice's only. A non-streamed request with n > 1 ends with one
    # output instead: every choice's (by index) in `choices`, its own text empty and its
    # completion_tokens their sum.
    choices: tuple[SequenceOutput, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its state in the engine; changed by the engine thread only
    (`cancelled` is the one flag other threads may set)."""

    request: GenerationRequest
    prompt_ids: list[int]
    text_stream: TextStream
    on_output: Callable[[SequenceOutput], None]
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")  # monotonic time after which it is ended (request_timeout_s)
    stop_ids: frozenset[int] = frozenset()  # tokens that end it besides the model's EOS (chat end-of-turn)
    grammar: Grammar | None = None  # where its response_format has got to (structured output)
    adapter_future: Future | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    lora_slot: int = -1
    row: int = -1  # index of its per-row state in the model runner while it runs
    seed: int = 0  # sampling seed: the request's, or a random one
    token_times: list[float] = field(default_factory=list)  # for latency figures (TTFT, ITL)
    cancelled: bool = False
    overtaken: int = 0  # later arrivals that started while it waited for its adapter (load or slot)
    starved_at: float = 0.0  # when `overtaken` reached max_num_seqs
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of each generated token, if asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of each prompt token computed, if asked
    logprobs_sent: int = 0  # generated tokens whose logprobs went out in an output
    index: int = 0  # which of the request's n choices
    finish_reason: FinishReason | None = None  # set when this choice ended
    group: SequenceGroup = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        seed = self.request.params.seed
        self.seed = secrets.randbits(64) if seed is None else choice_seed(seed, self.index)
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [TokenLogprob(self.prompt_ids[0], None)]  # nothing predicts the first token
        self.group = SequenceGroup([self])

    def unsent_logprobs(self) -> tuple[list[TokenLogprob] | None, list[TokenLogprob] | None]:
        """What the next output carries: the generated tokens' logprobs not sent yet, and the
        prompt's if the request's outputs have not carried them yet (None for what the request
        did not ask)."""
        new = None
        if self.params.logprobs is not None:
            new, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        prompt = None
        group = self.group
        if self.params.prompt_logprobs is not None and not group.prompt_logprobs_sent:
            prompt, group.prompt_logprobs_sent = group.choices[0].prompt_logprobs, True
        return new, prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class SequenceGroup:
    """A request's n choices (SamplingParams.n), as vLLM groups them: one prefill, n samples.

    Choice 0 computes the prompt. The others share its full K/V blocks (kv_cache.py) and have no
    token to compute (`num_computed` is the prompt's length) until the step that computes choice
    0's last prompt position: each of them samples its first token from that position's logits,
    with a seed of its own, and the prompt's last partial block is copied into its own (the fork,
    ModelRunner._fork). From then on every choice decodes as a sequence of its own.
    """

    choices: list[Sequence]
    ended: list[SequenceOutput] = field(default_factory=list)  # non-streamed n > 1: see LLMEngine._send_choice
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        head = self.choices[0]
        for seq in self.choices:
            seq.group = self
        for seq in self.choices[1:]:
            seq.num_computed = len(seq.prompt_ids)
            seq.arrival_time, seq.deadline = head.arrival_time, head.deadline

    @property
    def forks(self) -> list[Sequence]:
        """The choices still waiting for their first token from choice 0's prompt."""
        return [seq for seq in self.choices[1:] if seq.num_generated == 0 and seq.finish_reason is None]

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.choices)


def choice_seed(seed: int, index: int) -> int:
    """Choice i's sampling seed for a request's `seed`: the seed itself for the first choice (so
    n = 1 and the first of n choices give the same text), a hash of both for the others, so
    choices are reproducible and distinct."""
    return seed if index == 0 else splitmix64(splitmix64(seed) ^ index)
