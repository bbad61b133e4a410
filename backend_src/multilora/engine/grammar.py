"""Structured output with xgrammar: response formats compiled once, a matcher per sequence, and
each step's token masks filled while the forward pass runs.

- Compiling (10-40 ms for a schema on the demo tokenizer) is part of preparing a request
  (engine/prompts.py): on a prompt worker, never on the engine's thread nor, unless the format is
  compiled already, on the caller's. Compiled grammars are cached by format, so a schema sent
  again costs a dict lookup. A schema or regex the compiler refuses is an InvalidParameterError
  naming the problem, and the request is never queued.
- Each sequence with a format owns a `Grammar` (xgrammar's matcher): the engine thread advances it
  with every token it appends, and it ends the sequence when it has accepted a stop token.
- Each step, the rows that sample and have a grammar get their masks (one bit per token, xgrammar's
  packed int32 layout) filled by a worker thread, started before the forward pass: xgrammar drops
  the GIL while it fills, so the masks cost the step nothing on a GPU (the forward runs
  asynchronously) and overlap the forward's own Python and waits on a CPU. Rows without a grammar
  cost nothing, and a step without any starts no work.

Why xgrammar and not llguidance (both permissive licences: Apache-2.0 and MIT): measured side by
side on the demo tokenizer (49,152 tokens), xgrammar fills a row's mask 7-20x faster (3-9 us
against 18-163 us), which is paid every step, while llguidance compiles 10-40x faster (about 1 ms
against 10-40 ms), which is paid once per schema and cached. docs/design.md has the figures.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from ..errors import InvalidParameterError
from .response_format import FIELD, ResponseFormat, walk

if TYPE_CHECKING:
    from .sequence import Sequence

log = logging.getLogger(__name__)

CACHE_BYTES = 256 << 20  # compiled grammars kept, by their own size
_STRING_CHARACTER = r"[^\u0000-\u001f\ud800-\udfff]"  # see _bounded_strings_as_patterns
_COMPILER_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class Grammar:
    """One sequence's place in its grammar; used by the engine thread and, between steps' forward
    passes, by the mask worker (never both at once: the engine waits for the masks before it
    samples and advances)."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the mask should not have)."""
        return self._matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar is complete and has accepted a stop token: the sequence is over."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of an int32 [n, ceil(V / 32)] CPU bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


class CompiledFormat:
    """A response format compiled for this tokenizer; each choice that follows it starts its own Grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._compiled = compiled
        self.nbytes = compiled.memory_size_bytes

    def start(self, stop_ids: Iterable[int]) -> Grammar:
        """A fresh matcher; once the grammar is complete it allows exactly `stop_ids` (the model's
        EOS ids and the chat template's end-of-turn tokens)."""
        return Grammar(xgr.GrammarMatcher(self._compiled, override_stop_tokens=sorted(stop_ids)))


class Grammars:
    """Compiles response formats for one tokenizer, from any thread (one compile at a time)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width (the tokenizer's may be smaller)
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[ResponseFormat, CompiledFormat] = OrderedDict()
        self._cached_bytes = 0

    def at_hand(self, fmt: ResponseFormat | None) -> bool:
        """No format, or one compiled already: preparing the request needs no compile."""
        with self._lock:
            return fmt is None or fmt in self._cache

    def compiled(self, fmt: ResponseFormat) -> CompiledFormat:
        """`fmt` compiled (from the cache, or now); InvalidParameterError when it cannot be."""
        with self._lock:
            found = self._cache.get(fmt)
            if found is not None:
                self._cache.move_to_end(fmt)
                return found
            found = CompiledFormat(self._compile(fmt))
            self._cache[fmt] = found
            self._cached_bytes += found.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
            return found

    def _compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        if self._compiler is None:  # ~1 s for a 50k vocabulary: paid by the first request with a format
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        try:
            if fmt.kind == "regex":
                return self._compiler.compile_regex(fmt.value)
            # One line with ", " and ": " (json.dumps' layout): no run of whitespace for a model to get lost in.
            return self._compiler.compile_json_schema(_bounded_strings_as_patterns(fmt.value), any_whitespace=False)
        except RuntimeError as error:
            what = "regular expression" if fmt.kind == "regex" else "JSON schema"
            reason = _COMPILER_NOISE.sub("", str(error).strip().splitlines()[0])
            raise InvalidParameterError(FIELD, f"the {what} cannot be compiled: {reason}") from None


def _bounded_strings_as_patterns(schema_text: str) -> str:
    """The schema with each string's minLength / maxLength written as a pattern of characters.
    xgrammar 0.2.9 compiles a length-bounded string to a character class that lets raw control
    characters through (invalid JSON) and leaves out escapes (mlc-ai/xgrammar#800); both this and
    its `[\\s\\S]` also let a random model write UTF-8 for surrogate code points (invalid UTF-8,
    which decodes to three U+FFFD and breaks maxLength). The class below excludes both; like
    xgrammar's own, it cannot write escapes, so such strings hold no quote, backslash or newline."""
    schema = json.loads(schema_text)
    for node, _ in walk(schema):
        kinds = node.get("type", "string")
        if "string" in (kinds if isinstance(kinds, list) else [kinds]) and {"minLength", "maxLength"} & set(node):
            low, high = node.pop("minLength", 0), node.pop("maxLength", "")
            node["pattern"] = f"^{_STRING_CHARACTER}{{{low},{high}}}$"
    return json.dumps(schema, ensure_ascii=False)


class StepMasks:
    """Fills the masks of a step's rows that have a grammar, in one worker thread (made at the
    first such step), while the engine thread runs the forward pass."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32  # int32 words per row
        self._worker: ThreadPoolExecutor | None = None

    def start(self, sampling: list[Sequence]) -> PendingMasks | None:
        """Begin filling the masks of the sequences in `sampling` that have a grammar (None: none has)."""
        constrained = [seq for seq in sampling if seq.grammar is not None]
        if not constrained:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        # Allocated here: the worker runs no torch op, so it never starts an OpenMP team of its own.
        bitmask = torch.empty((len(constrained), self.words), dtype=torch.int32)
        grammars = [seq.grammar for seq in constrained]
        return PendingMasks(constrained, bitmask, self._worker.submit(_fill, grammars, bitmask))


class PendingMasks:
    def __init__(self, seqs: list[Sequence], bitmask: torch.Tensor, done: Future) -> None:
        self._row = {id(seq): i for i, seq in enumerate(seqs)}
        self._bitmask = bitmask
        self._done = done

    def collect(self, ready: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the fill; the indices in `ready` of the rows with a grammar [c] and their masks
        [c, words], both on `device`."""
        self._done.result()
        rows = [i for i, seq in enumerate(ready) if id(seq) in self._row]
        masks = self._bitmask[[self._row[id(ready[i])] for i in rows]]
        return torch.tensor(rows, dtype=torch.long).to(device), masks.to(device)


def _fill(grammars: list[Grammar], bitmask: torch.Tensor) -> None:
    for i, grammar in enumerate(grammars):
        try:
            grammar.fill(bitmask, i)
        except Exception:  # the row allows nothing, and the sampler fails it alone
            log.exception("filling a grammar's token mask failed")
            bitmask.numpy()[i] = 0
