"""Logprobs in each API's shape: OpenAI chat (`logprobs.content`), completions (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`, with `echo`), TGI (`details.tokens`, `top_tokens`,
`prefill`, per-token stream events); whole and streamed (no server)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from multilora_client.gateway.openai_api import ChatCompletionRequest, CompletionRequest, Reply
from multilora_client.gateway.openai_api import triton_call as openai_call
from multilora_client.gateway.tgi_api import GenerateRequest, response, stream_events
from multilora_client.gateway.tgi_api import triton_call as tgi_call
from multilora_client.response import Chunk, Generation


def token(id_: int, text: str, logprob: float | None, top: list | None = (), special: bool = False) -> dict:
    """One token as lora_llm sends it."""
    return {"id": id_, "token": text, "bytes": list(text.encode()), "special": special, "logprob": logprob,
            "top_logprobs": None if top is None else list(top)}


SEL = token(5, " SEL", -0.5, [token(5, " SEL", -0.5), token(9, " FROM", -1.25)])
ECT = token(6, "ECT", -0.25, [token(6, "ECT", -0.25), token(5, " SEL", -2.0)])
EOS = token(2, "</s>", -0.125, [token(2, "</s>", -0.125), token(6, "ECT", -3.0)], special=True)
PROMPT = [token(1, "<s>", None, None, special=True), token(7, "Hi", -4.0, [token(8, "Ho", -1.0), token(7, "Hi", -4.0)])]
HI = [{"role": "user", "content": "Hi"}]


# -- OpenAI chat ------------------------------------------------------------------------------------
def test_chat_asks_for_top_logprobs_only_with_logprobs():
    assert openai_call(ChatCompletionRequest(model="sql", messages=HI, logprobs=True, top_logprobs=2), "sql",
                       8).sampling == {"max_tokens": 8, "logprobs": 2}
    assert openai_call(ChatCompletionRequest(model="sql", messages=HI, logprobs=True), "sql", 8).sampling == {
        "max_tokens": 8, "logprobs": 0}
    with pytest.raises(ValidationError, match="top_logprobs"):
        ChatCompletionRequest(model="sql", messages=HI, logprobs=True, top_logprobs=21)


def test_whole_chat_answer_has_each_tokens_logprob_and_alternatives():
    reply = Reply(ChatCompletionRequest(model="sql", messages=HI, logprobs=True, top_logprobs=2), "chatcmpl")
    choice = reply.whole(Generation(" SELECT", "eos", 2, 3, [SEL, ECT, EOS]))["choices"][0]
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        (" SEL", -0.5, list(b" SEL")), ("ECT", -0.25, list(b"ECT")), ("</s>", -0.125, list(b"</s>"))]
    assert content[0]["top_logprobs"] == [{"token": " SEL", "logprob": -0.5, "bytes": list(b" SEL")},
                                          {"token": " FROM", "logprob": -1.25, "bytes": list(b" FROM")}]
    plain = Reply(ChatCompletionRequest(model="sql", messages=HI), "chatcmpl").whole(Generation("x", "eos", 1, 1))
    assert plain["choices"][0]["logprobs"] is None


def test_streamed_chat_chunks_carry_their_tokens():
    reply = Reply(ChatCompletionRequest(model="sql", messages=HI, logprobs=True, stream=True), "chatcmpl")
    events = reply.chunks(Chunk(" SEL", False, logprobs=[SEL]), first=True)
    events += reply.chunks(Chunk("ECT", False, logprobs=[ECT]), first=False)
    events += reply.chunks(Chunk("", True, "eos", 2, 3, logprobs=[EOS]), first=False)  # EOS: no text
    logprobs = [e["choices"][0]["logprobs"] for e in events]
    assert logprobs[0] is None  # the role chunk
    assert [[c["token"] for c in lp["content"]] for lp in logprobs[1:]] == [[" SEL"], ["ECT"], ["</s>"]]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# -- OpenAI completions -----------------------------------------------------------------------------
def test_completions_ask_for_prompt_logprobs_with_echo():
    assert openai_call(CompletionRequest(model="sql", prompt="Hi", logprobs=2), "sql", 8).sampling == {
        "max_tokens": 8, "logprobs": 2}
    assert openai_call(CompletionRequest(model="sql", prompt="Hi", logprobs=0, echo=True), "sql", 8).sampling == {
        "max_tokens": 8, "logprobs": 0, "prompt_logprobs": 0}
    assert openai_call(CompletionRequest(model="sql", prompt="Hi", echo=True), "sql", 8).sampling == {"max_tokens": 8}
    with pytest.raises(ValidationError, match="logprobs"):
        CompletionRequest(model="sql", prompt="Hi", logprobs=6)  # OpenAI's legacy limit


def test_whole_completion_with_echo_lists_the_prompts_tokens_first():
    reply = Reply(CompletionRequest(model="sql", prompt="Hi", logprobs=1, echo=True), "cmpl")
    choice = reply.whole(Generation(" SELECT", "eos", 2, 3, [SEL, ECT, EOS], PROMPT))["choices"][0]
    assert choice["text"] == "Hi SELECT"
    assert choice["logprobs"] == {
        "tokens": ["<s>", "Hi", " SEL", "ECT", "</s>"],
        "token_logprobs": [None, -4.0, -0.5, -0.25, -0.125],
        # the alternatives and the chosen token (up to k + 1, as OpenAI's legacy API)
        "top_logprobs": [None, {"Ho": -1.0, "Hi": -4.0}, {" SEL": -0.5, " FROM": -1.25}, {"ECT": -0.25, " SEL": -2.0},
                         {"</s>": -0.125, "ECT": -3.0}],
        "text_offset": [0, 0, 2, 6, 9],  # characters of the text before each token; special tokens are not in it
    }


def test_streamed_completion_offsets_run_on_across_chunks():
    reply = Reply(CompletionRequest(model="sql", prompt="Hi", logprobs=0, echo=True, stream=True), "cmpl")
    events = reply.chunks(Chunk(" SEL", False, logprobs=[SEL], prompt_logprobs=PROMPT), first=True)
    events += reply.chunks(Chunk("ECT", True, "length", 2, 2, logprobs=[ECT]), first=False)
    choices = [e["choices"][0] for e in events]
    assert [c["text"] for c in choices] == ["Hi", " SEL", "ECT", ""]
    assert choices[0]["logprobs"]["tokens"] == ["<s>", "Hi"] and choices[0]["logprobs"]["token_logprobs"][0] is None
    assert [c["logprobs"]["text_offset"] for c in choices[:3]] == [[0, 0], [2], [6]]
    assert choices[3]["logprobs"] is None and choices[3]["finish_reason"] == "length"


# -- TGI --------------------------------------------------------------------------------------------
def tgi(**parameters) -> GenerateRequest:
    return GenerateRequest(inputs="Hi", parameters=parameters)


def test_tgi_asks_for_tokens_where_the_answer_shows_them():
    assert "logprobs" not in tgi_call(tgi(), False, 8)[0].sampling
    assert tgi_call(tgi(details=True), False, 8)[0].sampling == {"max_tokens": 8, "logprobs": 0}
    assert tgi_call(tgi(details=True, top_n_tokens=3, decoder_input_details=True), False, 8)[0].sampling == {
        "max_tokens": 8, "logprobs": 3, "prompt_logprobs": 0}
    assert tgi_call(tgi(top_n_tokens=2), True, 8)[0].sampling == {"max_tokens": 8, "logprobs": 2}  # stream events
    assert "logprobs" not in tgi_call(tgi(top_n_tokens=2), False, 8)[0].sampling  # no details: nothing shows them
    with pytest.raises(ValidationError, match="top_n_tokens"):
        tgi(top_n_tokens=6)


def test_tgi_details_list_every_token_its_alternatives_and_the_prefill():
    body = tgi(details=True, top_n_tokens=2, decoder_input_details=True)
    details = response(body, Generation(" SELECT", "eos", 2, 3, [SEL, ECT, EOS], PROMPT), None)["details"]
    assert details["tokens"] == [{"id": 5, "text": " SEL", "logprob": -0.5, "special": False},
                                 {"id": 6, "text": "ECT", "logprob": -0.25, "special": False},
                                 {"id": 2, "text": "</s>", "logprob": -0.125, "special": True}]
    assert [[t["id"] for t in top] for top in details["top_tokens"]] == [[5, 9], [6, 5], [2, 6]]
    assert details["prefill"] == [{"id": 1, "text": "<s>", "logprob": None}, {"id": 7, "text": "Hi", "logprob": -4.0}]
    assert "top_tokens" not in response(tgi(details=True), Generation("x", "eos", 2, 1, [EOS]), None)["details"]


def test_tgi_stream_with_details_has_one_event_per_token():
    body = tgi(details=True, top_n_tokens=1)
    events = stream_events(body, Chunk(" SELECT", False, logprobs=[SEL, ECT]), 0, " SELECT", None)
    events += stream_events(body, Chunk("", True, "eos", 2, 3, logprobs=[EOS]), 2, " SELECT", None)
    assert [(e["index"], e["token"]["id"], e["token"]["text"], e["token"]["logprob"]) for e in events] == [
        (0, 5, " SEL", -0.5), (1, 6, "ECT", -0.25), (2, 2, "</s>", -0.125)]
    assert events[2]["token"]["special"] and [e["top_tokens"][0]["id"] for e in events] == [5, 6, 2]
    assert [e["generated_text"] for e in events] == [None, None, " SELECT"]
    assert events[2]["details"] == {"finish_reason": "eos_token", "generated_tokens": 3, "input_length": 2,
                                    "seed": None}
