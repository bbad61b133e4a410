"""Outputs as responses: waiting stream pieces joined (merge_pending), tensors per response."""
from __future__ import annotations

import json

from multilora.engine.sequence import FinishReason, SequenceOutput
from multilora.errors import GenerationError
from multilora.triton.responses import merge_pending, output_tensors


def piece(request_id: str, text: str) -> SequenceOutput:
    return SequenceOutput(request_id, text, False)


def final(request_id: str, text: str, tokens: int = 5) -> SequenceOutput:
    return SequenceOutput(request_id, text, True, FinishReason.LENGTH, 3, tokens, token_times=[1.0, 2.0])


def test_waiting_pieces_of_a_stream_go_as_one_response_with_the_final_counters():
    command = ("sender", {"adapters": []}, None)
    merged = merge_pending([piece("a", "He"), piece("b", "x"), command, piece("a", "llo"), final("a", "!"),
                            piece("b", "y")])
    assert merged == [final("a", "Hello!"), piece("b", "xy"), command]
    assert merged[0].token_times == [1.0, 2.0] and merged[0].completion_tokens == 5


def test_joined_pieces_give_the_text_of_the_stream():
    pieces = [piece("a", t) for t in ("The", " quick", " br", "own")] + [final("a", " fox")]
    for cut in range(len(pieces) + 1):  # whatever the sender found waiting at each pass
        sent = merge_pending(pieces[:cut]) + merge_pending(pieces[cut:])
        assert "".join(o.text for o in sent) == "The quick brown fox"
        assert [o.finished for o in sent].count(True) == 1 and sent[-1].finished


def test_an_error_is_never_merged_and_nothing_is_merged_into_a_finished_request():
    error = SequenceOutput("a", "", True, FinishReason.ERROR, error=GenerationError("boom"))
    assert merge_pending([piece("a", "x"), error]) == [piece("a", "x"), error]
    # A request id reused after its final output (the engine's ids are unique, but say it were).
    assert merge_pending([final("a", "x"), piece("a", "y")]) == [final("a", "x"), piece("a", "y")]


def test_only_the_final_response_carries_the_counters():
    assert set(output_tensors(piece("a", "x"))) == {"text_output", "index"}
    tensors = output_tensors(final("a", "é"))
    assert tensors["text_output"].tolist() == [["é".encode()]] and tensors["index"].tolist() == [[0]]
    assert tensors["finish_reason"].tolist() == [[b"length"]]
    assert tensors["prompt_tokens"].tolist() == [[3]] and tensors["completion_tokens"].tolist() == [[5]]


def test_logprobs_go_out_only_when_asked_as_json_with_each_tokens_text(demo_dir):
    from transformers import AutoTokenizer

    from multilora.engine.logprobs import TokenLogprob
    from multilora.engine.vocabulary import Vocabulary

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    vocabulary = Vocabulary(tokenizer)
    hello, eos = tokenizer.encode(" hello", add_special_tokens=False)[0], tokenizer.eos_token_id
    out = SequenceOutput("a", " hello", True, FinishReason.EOS, 2, 2,
                         logprobs=[TokenLogprob(hello, -0.5, ((hello, -0.5), (eos, -1.5))),
                                   TokenLogprob(eos, float("-inf"), ())],
                         prompt_logprobs=[TokenLogprob(tokenizer.bos_token_id, None),
                                          TokenLogprob(hello, float("nan"), ((eos, -0.25),))])
    tensors = output_tensors(out, vocabulary)
    generated = json.loads(tensors["logprobs"][0, 0])
    word = vocabulary[hello].text
    assert generated == [
        {"id": hello, "token": word, "bytes": list(word.encode()), "special": False, "logprob": -0.5,
         "top_logprobs": [{"id": hello, "token": word, "bytes": list(word.encode()), "special": False, "logprob": -0.5},
                          {"id": eos, "token": "</s>", "bytes": list(b"</s>"), "special": True, "logprob": -1.5}]},
        {"id": eos, "token": "</s>", "bytes": list(b"</s>"), "special": True, "logprob": -9999.0, "top_logprobs": []}]
    prompt = json.loads(tensors["prompt_logprobs"][0, 0])
    assert [(p["id"], p["logprob"], p["top_logprobs"] is None) for p in prompt] == [
        (tokenizer.bos_token_id, None, True), (hello, None, False)]  # NaN has no JSON either
    assert not {"logprobs", "prompt_logprobs"} & set(output_tensors(final("a", "x")))  # not asked: not sent


def test_merged_pieces_join_their_logprobs():
    from multilora.engine.logprobs import TokenLogprob

    first, second, third = (TokenLogprob(i, -1.0) for i in range(3))
    prompt = [TokenLogprob(7, None)]
    pieces = [SequenceOutput("a", "x", False, logprobs=[first], prompt_logprobs=prompt),
              SequenceOutput("a", "y", False, logprobs=[second]),
              SequenceOutput("a", "", True, FinishReason.LENGTH, 1, 3, logprobs=[third])]
    (merged,) = merge_pending(pieces)
    assert merged.logprobs == [first, second, third] and merged.prompt_logprobs == prompt and merged.text == "xy"


def choice(request_id: str, index: int, text: str, *, ends: bool = False, last: bool = False) -> SequenceOutput:
    """One choice's output of a streamed request with n > 1 (`ends`: its last; `last`: the request's)."""
    return SequenceOutput(request_id, text, last, FinishReason.LENGTH if ends else None, 3 if ends else 0,
                          4 if ends else 0, index=index)


def test_the_choices_of_a_stream_are_joined_each_on_its_own_and_the_final_stays_last():
    merged = merge_pending([choice("a", 0, "He"), choice("a", 1, "Bo"), choice("a", 0, "llo", ends=True),
                            choice("a", 1, "nd", ends=True, last=True)])
    assert merged == [choice("a", 0, "Hello", ends=True), choice("a", 1, "Bond", ends=True, last=True)]
    # Choice 1 waits in front of choice 0 when the request's final output (choice 0's end) comes:
    # the final is not joined into an earlier place, so it is still sent after choice 1's piece.
    merged = merge_pending([choice("a", 0, "He"), choice("a", 1, "Bo"), choice("a", 1, "nd", ends=True),
                            choice("a", 0, "llo", ends=True, last=True)])
    assert merged == [choice("a", 0, "He"), choice("a", 1, "Bond", ends=True),
                      choice("a", 0, "llo", ends=True, last=True)]
    assert [o.finished for o in merged].count(True) == 1 and merged[-1].finished


def test_a_non_streamed_request_with_n_choices_is_one_response_of_n_values():
    ends = [("x", FinishReason.LENGTH, 4), ("yz", FinishReason.EOS, 2)]
    choices = tuple(SequenceOutput("a", text, False, reason, 3, tokens, index=i)
                    for i, (text, reason, tokens) in enumerate(ends))
    tensors = output_tensors(SequenceOutput("a", "", True, None, 3, 6, choices=choices))
    assert tensors["text_output"].tolist() == [[b"x", b"yz"]] and tensors["index"].tolist() == [[0, 1]]
    assert tensors["finish_reason"].tolist() == [[b"length", b"eos"]]
    assert tensors["prompt_tokens"].tolist() == [[3, 3]] and tensors["completion_tokens"].tolist() == [[4, 2]]
    assert not {"logprobs", "prompt_logprobs"} & set(tensors)
