"""A request's state as it travels from parsing through the scheduler to its final response."""
from __future__ import annotations

import enum
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable


from .detokenizer import TextStream
from .logprobs import TokenLogprob
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


@dataclass(eq=False)
class Sequence:
    """A request's state in the engine; changed by the engine thread only (`cancelled` is the one
    flag other threads may set)."""

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
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        seed = self.request.params.seed
        self.seed = secrets.randbits(64) if seed is None else seed
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprob(self.prompt_ids[0], None)]  # nothing predicts the first token

    def unsent_logprobs(self) -> tuple[list[TokenLogprob] | None, list[TokenLogprob] | None]:
        """What the next output carries: the generated tokens' logprobs not sent yet, and the
        prompt's if not sent yet (None for what the request did not ask)."""
        new = None
        if self.params.logprobs is not None:
            new, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        prompt = None
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt, self.prompt_logprobs_sent = self.prompt_logprobs, True
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
