"""Chat requests: `messages` rendered with the right chat template, and the token that ends a turn.

Fine-tunes often expect their own prompt format, so an adapter folder may carry its own template
(`chat_template.jinja`, or `chat_template` in its `tokenizer_config.json`, as transformers saves
them), which wins over the base model's. Rendering is transformers' own `apply_chat_template`, so a
template behaves exactly as it does there. A template also decides how an assistant turn ends
(`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3); that token may not be among the model's eos ids,
so it is returned as a per-request stop token.

An adapter's template files are read as its weights are (`adapters.files.read_file`): only
regular files that resolve inside `adapter_dir`, of bounded size, so a symlink out of
it, a FIFO or a device node is refused by name and an outside file's text never reaches a prompt
or an error message. The read runs in a thread of its own, never on the thread that asks: storage
that hangs fails that adapter's chat requests after `read_timeout_s` (the engine's
adapter_load_timeout_s), and every later one at once until the read returns, while every other
request goes on. Each adapter's files are read once and kept until `invalidate` (an adapter
unloaded, perhaps to be replaced on disk).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.files import read_file
from ..adapters.ids import adapter_folder
from ..errors import AdapterLoadError, AdapterNotFoundError, InvalidParameterError

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_BYTES = 1 << 20  # chat_template.jinja: real ones are a few KB
# tokenizer_config.json also lists every added token: vocabularies with thousands of them (Gemma's)
# take over a megabyte, and fine-tunes often save it into the adapter folder.
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20
# Rendered as an assistant turn to see what a template writes after one (see _end_of_turn_ids).
_PROBE = "MultiLoraEndOfTurnProbe"
NOT_IN_ADAPTER_DIR = "not in adapter_dir"  # what a read finds for an adapter without a folder there


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

    def __init__(self, tokenizer: Any, adapter_dir: str | Path | None, read_timeout_s: float = 60.0) -> None:
        self.tokenizer = tokenizer
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._base: ChatTemplate | None = None
        self._base_known = False  # whether _base was looked for (the tokenizer may have none)
        # adapter id -> the read of its files: a Future of its ChatTemplate, None (it has none), or
        # for a read under way, possibly NOT_IN_ADAPTER_DIR (not kept once read: an adapter from
        # the Hub may be downloaded later, and the ids clients make up must not fill this).
        self._reads: dict[str, Future] = {}

    def render(self, messages: list[dict[str, str]], adapter_id: str | None = None,
               read: Future | None = None) -> ChatPrompt:
        """`messages` (from multilora.triton.messages) as the prompt text, ending with the generation
        prompt, in the adapter's own template if it has one, else the base model's. `read` is the
        adapter's `read` the caller waited for; without it this waits (read_timeout_s at most)."""
        own = self.own_template(adapter_id, read) if adapter_id is not None else None
        template = own if isinstance(own, ChatTemplate) else self.base_template()
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=template.text,
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 errors, raise_exception(...) in the template, type errors
            raise InvalidParameterError("messages", f"the chat template of {template.source} refused them: "
                                                    f"{type(exc).__name__}: {exc}") from None
        return ChatPrompt(text, template.stop_token_ids)

    def read(self, adapter_id: str) -> Future:
        """The read of an adapter's template files, started now in a thread of its own unless one
        is under way or done; it ends within read_timeout_s (an AdapterLoadError after that)."""
        if self.adapter_dir is None:
            read: Future = Future()
            read.set_result(NOT_IN_ADAPTER_DIR)
            return read
        with self._lock:
            read = self._reads.get(adapter_id)
            if read is not None:
                return read
            read = self._reads[adapter_id] = Future()
        timer = threading.Timer(self.read_timeout_s, _settle, (read, None, AdapterLoadError(
            f"adapter '{adapter_id}': its chat template was not read within adapter_load_timeout_s "
            f"({self.read_timeout_s:g} s); its storage may be stalled")))
        timer.daemon = True
        timer.start()
        threading.Thread(target=self._read_in_thread, args=(adapter_id, read, timer),
                         name=f"chat-template:{adapter_id}", daemon=True).start()
        return read

    def own_template(self, adapter_id: str, read: Future | None = None) -> ChatTemplate | str | None:
        """The adapter's own template, None when its folder has none, or NOT_IN_ADAPTER_DIR; raises
        what reading its files raised (refused files, bad JSON, a read past read_timeout_s)."""
        return (read or self.read(adapter_id)).result()  # within read_timeout_s: see read

    def base_template(self) -> ChatTemplate:
        """The base model's template (in its tokenizer: no file read here)."""
        with self._lock:
            if not self._base_known:
                text = _named_default(self.tokenizer.chat_template)
                self._base, self._base_known = (self._template(text, "the base model") if text else None), True
            base = self._base
        if base is None:
            raise InvalidParameterError("messages", "the base model has no chat template (no chat_template in "
                                                    "its tokenizer files); send text_input instead, or use "
                                                    "an adapter whose folder has a chat_template.jinja")
        return base

    def invalidate(self, adapter_id: str | None) -> None:
        """Forget what was read for an adapter (None: the base model), so the next request re-reads it."""
        with self._lock:
            if adapter_id is None:
                self._base_known = False
            else:
                self._reads.pop(adapter_id, None)

    def _read_in_thread(self, adapter_id: str, read: Future, timer: threading.Timer) -> None:
        result, error = None, None
        try:
            result = self._read_files(adapter_id)
        except Exception as exc:  # every failure reaches the requests waiting on it
            error = exc
        timer.cancel()
        if result is NOT_IN_ADAPTER_DIR:  # not kept: ids a client made up must not fill the cache
            with self._lock:
                if self._reads.get(adapter_id) is read:
                    del self._reads[adapter_id]
        if _settle(read, result, error):
            return
        # Too late: the requests that waited have failed. Later ones get what was read.
        late: Future = Future()
        _settle(late, result, error)
        with self._lock:
            if self._reads.get(adapter_id) is read:
                self._reads[adapter_id] = late
        log.warning("adapter '%s': the read of its chat template files returned after adapter_load_timeout_s; "
                    "later requests use what it found", adapter_id)

    def _read_files(self, adapter_id: str) -> ChatTemplate | str | None:
        """Runs in the read's own thread: every file access of a chat request happens here."""
        try:
            folder = adapter_folder(self.adapter_dir, adapter_id)
        except AdapterNotFoundError:
            return NOT_IN_ADAPTER_DIR
        found = adapter_template(adapter_id, folder, self.adapter_dir)
        if found is None:
            return None
        text, file_name = found
        return self._template(text, f"adapter '{adapter_id}' ({file_name})")

    def _template(self, text: str, source: str) -> ChatTemplate:
        return ChatTemplate(text, source, frozenset(_end_of_turn_ids(self.tokenizer, text, source)))


def adapter_template(adapter_id: str, folder: Path, root: Path | None) -> tuple[str, str] | None:
    """(template text, file it came from) of an adapter folder, or None when it carries none.
    `root` is adapter_dir: the files must be regular files that resolve inside it."""
    jinja = folder / TEMPLATE_FILE
    if os.path.lexists(jinja):  # there in any form: a FIFO or a symlink out is refused, not skipped
        try:
            return read_file(adapter_id, jinja, root, MAX_TEMPLATE_BYTES).decode("utf-8"), TEMPLATE_FILE
        except UnicodeDecodeError as exc:
            raise AdapterLoadError(f"adapter '{adapter_id}': {TEMPLATE_FILE} is not UTF-8 text ({exc.reason} "
                                   f"at byte {exc.start})") from None
    config = folder / TOKENIZER_CONFIG_FILE
    if not os.path.lexists(config):
        return None
    data = read_file(adapter_id, config, root, MAX_TOKENIZER_CONFIG_BYTES)
    try:
        value = json.loads(data).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as exc:
        raise InvalidParameterError("messages", f"{folder.name}/{TOKENIZER_CONFIG_FILE} is not a JSON object "
                                                f"({exc})") from None
    text = _named_default(value)
    return (text, TOKENIZER_CONFIG_FILE) if text else None


def files_at_hand(read: Future) -> bool:
    """Whether `read` (ChatTemplates.read) has ended with what the adapter's folder holds: a
    template, none, or the error that refused its files. Rendering with it then reads no file, and
    the adapter is known to have a folder in adapter_dir."""
    return read.done() and (read.exception() is not None or read.result() is not NOT_IN_ADAPTER_DIR)


def _settle(future: Future, result: Any, error: BaseException | None) -> bool:
    """Complete `future` unless it is already (the read and its timer race); True if this did."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


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
