"""Chat requests: `messages` rendered with the right chat template, and the token that ends a turn.

Fine-tunes often expect their own prompt format, so an adapter folder may carry its own template
(`chat_template.jinja`, or `chat_template` in its `tokenizer_config.json`, as transformers saves
them), which wins over the base model's. Rendering is transformers' own `apply_chat_template`, so a
template behaves exactly as it does there. A template also decides how an assistant turn ends
(`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3); that token may not be among the model's eos ids,
so it is returned as a per-request stop token.

Templates are read once per adapter and kept until `invalidate` (an adapter unloaded, perhaps to be
replaced on disk).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.ids import adapter_folder
from ..errors import AdapterNotFoundError, InvalidParameterError

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Rendered as an assistant turn to see what a template writes after one (see _end_of_turn_ids).
_PROBE = "MultiLoraEndOfTurnProbe"
_NOT_ON_DISK = object()


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: str  # where it came from, for error messages: "adapter 'sql' (chat_template.jinja)"
    stop_token_ids: frozenset[int]  # the token(s) that end an assistant turn in this template


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation. Tokenize `text` without adding special tokens: the template
    already wrote the ones it wants (a second BOS would change the model's answer)."""

    text: str
    stop_token_ids: frozenset[int]


class ChatTemplates:
    """The chat template of the base model and of each adapter, read once each (thread-safe)."""

    def __init__(self, tokenizer: Any, adapter_dir: str | Path | None) -> None:
        self.tokenizer = tokenizer
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._lock = threading.Lock()
        self._cache: dict[str | None, ChatTemplate | None] = {}  # adapter id (None: base) -> template

    def render(self, messages: list[dict[str, str]], adapter_id: str | None = None) -> ChatPrompt:
        """`messages` (from multilora.triton.messages) as the prompt text, ending with the generation prompt."""
        template = self.template_for(adapter_id)
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=template.text,
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 errors, raise_exception(...) in the template, type errors
            raise InvalidParameterError("messages", f"the chat template of {template.source} refused them: "
                                                    f"{type(exc).__name__}: {exc}") from None
        return ChatPrompt(text, template.stop_token_ids)

    def template_for(self, adapter_id: str | None) -> ChatTemplate:
        """The adapter's own template if it has one, else the base model's."""
        own = self._cached(adapter_id) if adapter_id is not None else None
        return own or self._cached(None)

    def invalidate(self, adapter_id: str | None) -> None:
        """Forget what was read for an adapter (None: the base model), so the next request re-reads it."""
        with self._lock:
            self._cache.pop(adapter_id, None)

    def _cached(self, adapter_id: str | None) -> ChatTemplate | None:
        with self._lock:
            if adapter_id in self._cache:
                return self._cache[adapter_id]
        found = self._read(adapter_id)  # outside the lock: file reads; a race only reads twice
        if found is not _NOT_ON_DISK:
            with self._lock:
                self._cache[adapter_id] = found
        return found if isinstance(found, ChatTemplate) else None

    def _read(self, adapter_id: str | None) -> ChatTemplate | None | object:
        """The template found; None for an adapter without one; _NOT_ON_DISK for an adapter not in
        adapter_dir (not cached: a Hub adapter may be downloaded later, and an unknown one fails
        with its own error when the engine asks for its weights)."""
        if adapter_id is None:
            text = _named_default(self.tokenizer.chat_template)
            if not text:
                raise InvalidParameterError("messages", "the base model has no chat template (no chat_template in "
                                                        "its tokenizer files); send text_input instead, or use "
                                                        "an adapter whose folder has a chat_template.jinja")
            return self._template(text, "the base model")
        if self.adapter_dir is None:
            return _NOT_ON_DISK
        try:
            folder = adapter_folder(self.adapter_dir, adapter_id)
        except AdapterNotFoundError:
            return _NOT_ON_DISK
        found = adapter_template(folder)
        if found is None:
            return None
        text, file_name = found
        return self._template(text, f"adapter '{adapter_id}' ({file_name})")

    def _template(self, text: str, source: str) -> ChatTemplate:
        return ChatTemplate(text, source, frozenset(_end_of_turn_ids(self.tokenizer, text, source)))


def adapter_template(folder: Path) -> tuple[str, str] | None:
    """(template text, file it came from) of an adapter folder, or None when it carries none."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), TEMPLATE_FILE
    config = folder / TOKENIZER_CONFIG_FILE
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise InvalidParameterError("messages", f"{folder.name}/{TOKENIZER_CONFIG_FILE} is not a JSON object "
                                                f"({exc})") from None
    text = _named_default(value)
    return (text, TOKENIZER_CONFIG_FILE) if text else None


def _named_default(value: Any) -> str | None:
    """A template, or the "default" one of named templates (a dict, or the list of {name, template}
    that tokenizer_config.json holds)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value.strip() else None


def _end_of_turn_ids(tokenizer: Any, template: str, source: str) -> set[int]:
    """The first special token the template writes after an assistant message's content.

    Rendering a probe conversation and looking right after the probe finds `<|im_end|>` (ChatML),
    `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma) or `</s>` without knowing any template family.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception as exc:  # a template may refuse this conversation; only the stop token is lost
        log.warning("chat template of %s: cannot find its end-of-turn token (%s)", source, exc)
        return set()
    _, found, after = text.partition(_PROBE)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer.encode(after, add_special_tokens=False) if found else []:
        if token_id in special:
            return {token_id}
    return set()
