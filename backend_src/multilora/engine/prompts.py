"""From a request to the token ids the engine runs: chat rendering, tokenizing, length limits.

Runs on the caller's thread (Triton's), never the engine's. A prompt that cannot fit
`max_model_len` is refused by its length in characters before it is tokenized, so a huge input
costs a comparison, not a tokenizer pass over megabytes of text. A request that could never be
admitted (more choices than rows, more blocks than the KV cache has) is refused here too, so it
never waits for ever.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from ..errors import InvalidParameterError, RequestTooLongError
from .chat_template import ChatPrompt, ChatTemplates
from .sequence import GenerationRequest

if TYPE_CHECKING:
    from .kv_cache import KVCache

CHARS_PER_TOKEN_MARGIN = 2  # see max_prompt_chars


@dataclass(frozen=True)
class Prompt:
    request: GenerationRequest  # with `prompt` set to the rendered chat, if it was one
    token_ids: list[int]
    stop_ids: frozenset[int]  # end-of-turn tokens of its chat template


class Prompts:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_templates: ChatTemplates, *, max_model_len: int,
                 kv_cache: KVCache, max_num_seqs: int, check_adapter: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.chat_templates = chat_templates
        self.max_model_len = max_model_len
        self.kv_cache = kv_cache  # only its sizes are read here (they never change)
        self.max_num_seqs = max_num_seqs
        self.max_chars = max_prompt_chars(tokenizer, max_model_len)
        self._check_adapter = check_adapter  # raises for an unknown adapter

    def prepare(self, request: GenerationRequest) -> Prompt:
        """Render and tokenize; raises a UserError (empty, too long, bad chat)."""
        stop_ids: frozenset[int] = frozenset()
        if request.messages is not None:
            chat = self._render_chat(request)
            request = dataclasses.replace(request, prompt=chat.text)  # what exclude_input_in_output=false echoes
            stop_ids = chat.stop_token_ids
        # Each message names the field to change: the prompt when it leaves no room for one new
        # token by itself, max_tokens when fewer new tokens would fit.
        prompt_field = "messages" if request.messages is not None else "text_input"
        if len(request.prompt) > self.max_chars:
            raise RequestTooLongError(
                f"invalid '{prompt_field}': the prompt has {len(request.prompt)} characters, more than "
                f"{self.max_model_len} tokens (max_model_len) can hold with this tokenizer (at most "
                f"{self.max_chars} characters)")
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
        return Prompt(request, ids, stop_ids)

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

    def _render_chat(self, request: GenerationRequest) -> ChatPrompt:
        try:
            return self.chat_templates.render(request.messages, request.adapter_id)
        except InvalidParameterError:
            if request.adapter_id:
                self._check_adapter(request.adapter_id)  # an unknown adapter is the first thing to say
            raise


def max_prompt_chars(tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> int:
    """Characters above which a prompt cannot fit max_model_len tokens, found before tokenizing it.

    No token of the vocabulary stands for more characters than its longest spelling (byte-level and
    SentencePiece vocabularies spell a token with at least one character per character it
    decodes to), so a prompt needs at least len(prompt) / longest tokens. The margin covers
    normalizers that drop characters; the exact token count is checked after tokenizing anyway.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1) * CHARS_PER_TOKEN_MARGIN


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
