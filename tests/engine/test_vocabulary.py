"""Token ids as the bytes and text logprobs report: the tokens' bytes join to the text they encode,
whatever the vocabulary's scheme, also where a character is split over tokens."""
from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from multilora.engine.vocabulary import Vocabulary

TEXT = "hello ça va, the fox 日本"


def test_byte_level_tokens_are_their_bytes(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")  # byte-level BPE, like GPT-2 and SmolLM2
    vocabulary = Vocabulary(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert b"".join(vocabulary[i].bytes for i in ids) == TEXT.encode()
    split = [vocabulary[i] for i in ids if vocabulary[i].bytes and vocabulary[i].bytes[0] >= 0x80]
    assert split and all(t.text == t.bytes.decode("utf-8", errors="replace") for t in split)
    eos = vocabulary[tokenizer.eos_token_id]
    assert (eos.text, eos.special) == ("</s>", True) and not vocabulary[ids[0]].special
    assert vocabulary[len(tokenizer) + 5].bytes == b""  # an id of a padded model vocabulary


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style vocabulary: `▁` for spaces, `<0xNN>` tokens for bytes it has no piece for."""
    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    words.train_from_iterator(["hello world, the quick brown fox"] * 20,
                              trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                  show_progress=False))
    model = json.loads(words.to_str())["model"]
    vocab = dict(model["vocab"]) | {f"<0x{b:02X}>": len(model["vocab"]) + b for b in range(256)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = words.normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_tokens_are_their_bytes():
    tokenizer = sentencepiece_tokenizer()
    vocabulary = Vocabulary(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "the test wants byte tokens"
    assert b"".join(vocabulary[i].bytes for i in ids) == (" " + TEXT).encode()  # SentencePiece's leading space
    assert vocabulary[tokenizer.bos_token_id].bytes == b"<s>" and vocabulary[tokenizer.bos_token_id].special
