"""Token ids as the text and bytes that logprobs report.

A token's bytes are what it adds to the output. In byte-level BPE vocabularies (GPT-2, Llama 3,
Qwen2, SmolLM2) each character of a token's spelling stands for one byte; in SentencePiece ones
`▁` is a space and `<0xNN>` one byte; any other tokenizer decodes the token alone. Its text is
those bytes as UTF-8, with U+FFFD where they end inside a character (the `bytes` then show the
part of the character this token holds, as OpenAI's `bytes` field does). Special and added tokens
(BOS, EOS, end-of-turn) are spelled as themselves; special ones are flagged (TGI's `special`).

Built lazily, one entry per id asked for; read from Triton's sender thread only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
_SPACE = "\u2581"  # SentencePiece's word boundary


@dataclass(frozen=True)
class VocabToken:
    text: str
    bytes: bytes
    special: bool


class Vocabulary:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder  # id -> AddedToken: spelled as themselves
        self._added = {i: token.content for i, token in added.items()}
        self._special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
        self._scheme = _scheme(tokenizer)
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._tokens: dict[int, VocabToken] = {}

    def __getitem__(self, token_id: int) -> VocabToken:
        token = self._tokens.get(token_id)
        if token is None:
            data = self._bytes(token_id)
            token = self._tokens[token_id] = VocabToken(data.decode("utf-8", errors="replace"), data,
                                                        token_id in self._special)
        return token

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        spelling = self._tokenizer.convert_ids_to_tokens(token_id)
        if spelling is None:  # an id of the model's padded vocabulary that the tokenizer lacks
            return b""
        if self._scheme == "byte-level" and all(c in self._byte_of for c in spelling):
            return bytes(self._byte_of[c] for c in spelling)
        if self._scheme == "sentencepiece":
            byte = _BYTE_TOKEN.fullmatch(spelling)
            return bytes([int(byte.group(1), 16)]) if byte else spelling.replace(_SPACE, " ").encode("utf-8")
        return self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")


def _scheme(tokenizer: PreTrainedTokenizerBase) -> str:
    """How a token's spelling maps to bytes: "byte-level", "sentencepiece" or "decode"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else "decode"
    decoder = json.loads(backend.decoder.__getstate__())
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        return "byte-level"
    if kinds & {"ByteFallback", "Metaspace"} or "Replace" in kinds:
        return "sentencepiece"
    return "decode"
