import pytest
from transformers import AutoTokenizer

from multilora.engine.detokenizer import TextStream


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir / "base")


def stream_all(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, tokenizer.encode("Prompt:"), stop)
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


@pytest.mark.parametrize("text", ["한국어 텍스트 🎉 ok", "plain ascii, then Ελληνικά 🦀!"])
def test_pieces_never_split_a_character_and_join_to_the_full_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    byte_tokens = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert byte_tokens, "the test needs tokens that end inside a multi-byte character"
    pieces, stream = stream_all(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == stream.text


def test_a_character_cut_by_max_tokens_is_still_returned(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    pieces, _ = stream_all(tokenizer, ids[:-1])
    assert "".join(pieces) == tokenizer.decode(ids[:-1])


def test_stop_string_cuts_the_text_and_nothing_after_it_is_streamed(tokenizer):
    ids = tokenizer.encode("SELECT name FROM orders; DROP TABLE x", add_special_tokens=False)
    pieces, stream = stream_all(tokenizer, ids, stop=("; DROP",))
    assert stream.stopped
    assert "".join(pieces) == "SELECT name FROM orders" == stream.text


def test_partial_stop_prefix_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("a;b;c", add_special_tokens=False)
    pieces, stream = stream_all(tokenizer, ids, stop=(";X",))
    assert not stream.stopped and "".join(pieces) == "a;b;c"
    assert not any(p.endswith(";") for p in pieces[:-1])
