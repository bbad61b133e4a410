"""Token ids to text pieces for streaming: UTF-8 safe, and stop strings cut exactly.

A piece is released only when it can no longer change: not while the decoded text ends in an
incomplete UTF-8 character (U+FFFD), and not while its tail could be the start of a stop string.
Joining the pieces gives the same text a non-streamed request returns.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 4  # prompt tokens decoded with the output so leading spaces come out right


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = stop
        self.text = ""  # all text decoded so far (before any stop cut)
        self._released = 0  # chars of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (maybe "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything not yet returned, at the end of generation."""
        if not self.stopped:
            self.text += self._undecoded_tail()
        return self._release(final=True)

    def _undecoded_tail(self) -> str:
        """Text of tokens held back (e.g. an incomplete character at the very end)."""
        held = self._decode(self._ids[self._prefix:])
        done = self._decode(self._ids[self._prefix:self._read])
        return held[len(done):] if held.startswith(done) else ""

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self._stop and not self.stopped:
            search_from = max(0, self._released - max(len(s) for s in self._stop))
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
                end = len(self.text)
            elif not final:
                end -= self._partial_stop_suffix()
        piece = self.text[self._released:end]
        self._released = end
        return piece

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
