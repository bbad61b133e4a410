"""From a request to the token ids the engine runs: chat rendering, tokenizing, length limits.

Not on the thread every request waits on: Triton calls `LLMEngine.add_request` for one request
after another on one thread, so `start` prepares only a short prompt there (a few milliseconds)
and hands a long one to a prompt worker; a chat whose adapter's template files are not read yet
waits for that read (chat_template: a thread of its own, adapter_load_timeout_s at most) before a
worker renders it, holding no thread meanwhile. Never on the engine's thread either. A worker's
tokenizing leaves the other threads running: transformers encodes through the fast tokenizer's
batch call, which releases the interpreter while it works.

A prompt that cannot fit `max_model_len` is refused by its length in characters before it is
tokenized (max_prompt_chars), where it arrives, so a huge input costs a comparison, not a
tokenizer pass over megabytes of text. A request that could never be admitted (more choices than
rows, more blocks than the KV cache has) is refused here too, so it never waits for ever. A
response_format is compiled here as well (engine/grammar.py; on a worker unless it is cached), so a
schema that does not compile refuses the request before it is queued.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from ..errors import InvalidParameterError, RequestTooLongError
from .chat_template import ChatPrompt, ChatTemplates, files_at_hand
from .sequence import GenerationRequest

if TYPE_CHECKING:
    from .grammar import CompiledFormat, Grammars
    from .kv_cache import KVCache

CHARS_PER_TOKEN_CEILING = 16  # see max_prompt_chars
CHARS_PER_TOKEN_MARGIN = 2
INLINE_CHARS = 4096  # prompts (a chat: its messages' text) up to this long are prepared on the caller's thread
PROMPT_WORKERS = 2  # two: one long prompt does not hold up the next


@dataclass(frozen=True)
class Prompt:
    request: GenerationRequest  # with `prompt` set to the rendered chat, if it was one
    token_ids: list[int]
    stop_ids: frozenset[int]  # end-of-turn tokens of its chat template
    format: CompiledFormat | None = None  # its response_format, compiled: each choice starts a Grammar from it


class Prompts:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_templates: ChatTemplates, *, max_model_len: int,
                 kv_cache: KVCache, max_num_seqs: int, check_adapter: Callable[[str], None], grammars: Grammars,
                 workers: int = PROMPT_WORKERS) -> None:
        self.tokenizer = tokenizer
        self.chat_templates = chat_templates
        self.grammars = grammars
        self.max_model_len = max_model_len
        self.kv_cache = kv_cache  # only its sizes are read here (they never change)
        self.max_num_seqs = max_num_seqs
        self.max_chars = max_prompt_chars(tokenizer, max_model_len)
        self._check_adapter = check_adapter  # raises for an unknown adapter
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="prompt")

    def start(self, request: GenerationRequest) -> Future:
        """Prepare `request` where it holds up no other request: a Future of its Prompt, or of
        the UserError that refuses it. It is done on return for a text prompt refused by its
        length, and for a short prompt or chat whose template and response_format are at hand;
        others end on a worker."""
        prepared: Future = Future()
        read = None
        compiled = self.grammars.at_hand(request.params.response_format)
        if request.messages is None:
            quick = len(request.prompt) <= INLINE_CHARS and compiled or len(request.prompt) > self.max_chars
        else:
            read = self.chat_templates.read(request.adapter_id) if request.adapter_id else None
            quick = _text_length(request.messages) <= INLINE_CHARS and (read is None or files_at_hand(read)) \
                and compiled
        if quick:
            _run_into(prepared, self.prepare, request, read)
        elif read is not None and not read.done():
            read.add_done_callback(lambda read: self._on_worker(prepared, request, read))
        else:
            self._on_worker(prepared, request, read)
        return prepared

    def prepare(self, request: GenerationRequest, read: Future | None = None) -> Prompt:
        """Render, tokenize and compile the response_format on this thread; raises a UserError
        (empty, too long, bad chat, a format that does not compile).
        `read`: the adapter's ChatTemplates.read, when the caller waited for it."""
        stop_ids: frozenset[int] = frozenset()
        if request.messages is not None:
            chat = self._render_chat(request, read)
            request = dataclasses.replace(request, prompt=chat.text)  # what exclude_input_in_output=false echoes
            stop_ids = chat.stop_token_ids
        # Each message names the field to change: the prompt when it leaves no room for one new
        # token by itself, max_tokens when fewer new tokens would fit.
        prompt_field = "messages" if request.messages is not None else "text_input"
        if len(request.prompt) > self.max_chars:
            raise RequestTooLongError(
                f"invalid '{prompt_field}': the prompt has {len(request.prompt)} characters, more than "
                f"{self.max_model_len} tokens (max_model_len) can hold with this tokenizer (at most "
                f"{self.max_chars} characters: {self.max_chars // self.max_model_len} per token)")
        # A rendered chat already holds the template's special tokens (BOS included where it wants one).
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=request.messages is None)
        if not ids:
            raise InvalidParameterError("text_input", "the prompt is empty")
        params = request.params
        needed = len(ids) + params.max_tokens
        if needed > self.max_model_len:
            field = prompt_field if len(ids) >= self.max_model_len else "max_tokens"
            raise RequestTooLongError(
                f"invalid '{field}': the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}; "
                f"together they must be at most max_model_len ({self.max_model_len})")
        self._check_admissible(len(ids), params.max_tokens, params.n, prompt_field)
        fmt = params.response_format
        return Prompt(request, ids, stop_ids, None if fmt is None else self.grammars.compiled(fmt))

    def _check_admissible(self, prompt_tokens: int, max_tokens: int, n: int, prompt_field: str) -> None:
        """Raise unless n choices of this length fit the rows and the KV cache when nothing else
        runs; the message names the prompt when it cannot fit with one new token by itself, n when
        n choices of one new token cannot, max_tokens otherwise."""
        if n > self.max_num_seqs:
            raise InvalidParameterError("n", f"{n} choices need {n} running rows; this server runs at most "
                                             f"max_num_seqs ({self.max_num_seqs})")

        def fits(new_tokens: int, choices: int) -> bool:
            shared, own = self.kv_cache.choice_blocks(prompt_tokens, prompt_tokens + new_tokens)
            return shared + choices * own <= self.kv_cache.num_blocks

        if not fits(max_tokens, n):
            field = prompt_field if not fits(1, 1) else "n" if not fits(1, n) else "max_tokens"
            choices = f" in each of {n} choices" if n > 1 else ""
            raise RequestTooLongError(
                f"invalid '{field}': the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}){choices} "
                f"can never fit the KV cache budget ({self.kv_cache.num_blocks * self.kv_cache.block_size} tokens)")

    def close(self) -> None:
        """Stop the workers; preparations not started yet are dropped (the engine is shutting down)."""
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _on_worker(self, prepared: Future, request: GenerationRequest, read: Future | None) -> None:
        self._workers.submit(_run_into, prepared, self.prepare, request, read)

    def _render_chat(self, request: GenerationRequest, read: Future | None) -> ChatPrompt:
        if request.adapter_id and read is None:
            read = self.chat_templates.read(request.adapter_id)
        try:
            return self.chat_templates.render(request.messages, request.adapter_id, read)
        except InvalidParameterError:
            if read is not None and not files_at_hand(read):  # not in adapter_dir: is it known at all?
                self._check_adapter(request.adapter_id)  # an unknown adapter is the first thing to say
            raise


def max_prompt_chars(tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> int:
    """Characters above which a prompt is refused before tokenizing: max_model_len tokens at
    CHARS_PER_TOKEN_CEILING characters each (fewer for a vocabulary whose tokens are all short).

    Ordinary text takes far fewer characters per token; measured with the demo's tokenizer
    (SmolLM2, byte-level BPE): English prose 3.6, Python source 4.0, random characters 1.1. Only
    text made mostly of long runs (indentation, lines of '#' or '=', which the vocabulary holds as
    single tokens of up to 81 characters) averages more, and such a prompt longer than the limit is
    refused though it might fit. The bound it replaces, the longest token's length, admitted 1.3M
    characters for max_model_len 8192, which took 2.1 s to tokenize before the token count refused them.
    A vocabulary whose longest token is short bounds a token tighter; the margin covers
    normalizers that drop characters. The exact token count is checked after tokenizing anyway.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_model_len * min(CHARS_PER_TOKEN_CEILING, max(longest, 1) * CHARS_PER_TOKEN_MARGIN)


def _text_length(messages: list[dict]) -> int:
    return sum(len(str(value)) for message in messages for value in message.values())


def _run_into(future: Future, prepare: Callable[..., Prompt], *args: object) -> None:
    """Run `prepare(*args)` into `future`: its Prompt, or what it raised (every request gets an answer)."""
    try:
        future.set_result(prepare(*args))
    except Exception as error:
        future.set_exception(error)


def eos_ids(model_dir: Path, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id the checkpoint calls end-of-sequence (config, tokenizer, generation_config)."""
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:
        pass  # no generation_config.json
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
