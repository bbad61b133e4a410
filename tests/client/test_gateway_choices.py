"""OpenAI's `n` and TGI's `best_of` over lora_llm's choices: the requests, the answers' shapes, and
the gateway app end to end over a stand-in for Triton."""
from __future__ import annotations

import dataclasses
import json

import pytest
from starlette.testclient import TestClient

from multilora_client.gateway.app import GatewayConfig, create_app
from multilora_client.gateway.errors import ApiError
from multilora_client.gateway.openai_api import ChatCompletionRequest, CompletionRequest, Reply, triton_call
from multilora_client.gateway.tgi_api import GenerateRequest, response, status
from multilora_client.gateway.tgi_api import triton_call as tgi_call
from multilora_client.response import Chunk, Generation

HI = [{"role": "user", "content": "Hi"}]


def token(id_: int, text: str, logprob: float) -> dict:
    return {"id": id_, "token": text, "bytes": list(text.encode()), "special": False, "logprob": logprob,
            "top_logprobs": []}


def two_choices(prompt_logprobs: list | None = None) -> Generation:
    """As Generation.of joins a request's chunks: the first choice's fields, and every choice."""
    first = Generation("Hello", "length", 4, 2, [token(1, "Hel", -0.5), token(2, "lo", -0.25)], prompt_logprobs)
    second = Generation("Yo", "eos", 4, 1, [token(3, "Yo", -1.0)], prompt_logprobs)
    return dataclasses.replace(first, choices=(first, second))


def test_n_goes_to_lora_llm_and_one_is_left_out():
    assert triton_call(ChatCompletionRequest(model="sql", messages=HI, n=4, seed=3), "sql", 16).sampling == \
        {"max_tokens": 16, "seed": 3, "n": 4}
    assert "n" not in triton_call(ChatCompletionRequest(model="sql", messages=HI, n=1), "sql", 16).sampling


def test_a_whole_chat_answer_has_a_choice_per_index_and_usage_over_all():
    answer = Reply(ChatCompletionRequest(model="sql", messages=HI, n=2, logprobs=True), "chatcmpl").whole(two_choices())
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == \
        [(0, "Hello", "length"), (1, "Yo", "stop")]
    assert [[t["token"] for t in c["logprobs"]["content"]] for c in answer["choices"]] == [["Hel", "lo"], ["Yo"]]
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_a_whole_completion_with_echo_puts_the_prompt_in_front_of_every_choice():
    prompt = [{**token(9, "Say", 0.0), "logprob": None, "top_logprobs": None}]
    body = CompletionRequest(model="sql", prompt="Say", echo=True, logprobs=0, n=2)
    answer = Reply(body, "cmpl").whole(two_choices(prompt))
    assert [c["text"] for c in answer["choices"]] == ["SayHello", "SayYo"]
    assert [c["logprobs"]["tokens"] for c in answer["choices"]] == [["Say", "Hel", "lo"], ["Say", "Yo"]]
    assert [c["logprobs"]["text_offset"] for c in answer["choices"]] == [[0, 3, 6], [0, 3]]


def test_streamed_choices_open_together_and_end_one_by_one_with_the_usage_last():
    reply = Reply(ChatCompletionRequest(model="sql", messages=HI, n=2, stream=True,
                                        stream_options={"include_usage": True}), "chatcmpl")
    chunks = [Chunk("He", False, index=1), Chunk("Yo", False, "eos", 4, 1, index=0),
              Chunk("llo", True, "length", 4, 2, index=1)]
    events = [e for i, c in enumerate(chunks) for e in reply.chunks(c, first=i == 0)]
    choices = [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"])
               for e in events if e["choices"]]
    assert choices == [(0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
                       (1, {"content": "He"}, None), (0, {"content": "Yo"}, None), (0, {}, "stop"),
                       (1, {"content": "llo"}, None), (1, {}, "length")]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == \
        {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


class FakeTriton:
    """Stands for the gateway's Triton: answers every call with the given lora_llm responses."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.answer, self.calls = chunks, []

    def chunks(self, call):
        self.calls.append(call)

        async def responses():
            for chunk in self.answer:
                yield chunk
        return responses()

    async def base_model_name(self) -> str:
        return "base"

    async def close(self) -> None:
        pass


@pytest.fixture
def gateway():
    with TestClient(create_app(GatewayConfig())) as client:
        yield client


def test_the_app_answers_n_choices_whole_and_streamed(gateway):
    whole = [Chunk("Hello", False, "length", 4, 2), Chunk("Yo", True, "eos", 4, 1, index=1)]
    gateway.app.state.triton = triton = FakeTriton(whole)
    answer = gateway.post("/v1/completions", json={"model": "sql", "prompt": "Say", "n": 2, "max_tokens": 2}).json()
    assert triton.calls[0].sampling["n"] == 2 and not triton.calls[0].stream
    assert [(c["index"], c["text"]) for c in answer["choices"]] == [(0, "Hello"), (1, "Yo")]
    assert answer["usage"]["completion_tokens"] == 3

    gateway.app.state.triton = FakeTriton([Chunk("He", False, index=1), Chunk("Yo", False, "eos", 4, 1),
                                           Chunk("llo", True, "length", 4, 2, index=1)])
    with gateway.stream("POST", "/v1/chat/completions", json={"model": "sql", "messages": HI, "n": 2,
                                                              "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for event in events:
        choice = event["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {0: "Yo", 1: "Hello"}
    assert [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events
            if e["choices"][0]["finish_reason"]] == [(0, "stop"), (1, "length")]


def test_tgi_best_of_samples_n_choices_with_logprobs_and_refuses_greedy_and_streams():
    body = GenerateRequest(inputs="x", parameters={"best_of": 2, "do_sample": True, "seed": 5})
    call, seed = tgi_call(body, False, 8)
    assert call.sampling == {"max_tokens": 8, "n": 2, "logprobs": 0, "temperature": 1.0, "seed": 5} and seed == 5
    for parameters, stream, message in (({"best_of": 2}, False, "you must use sampling"),
                                        ({"best_of": 2, "do_sample": True}, True, "not supported when streaming")):
        with pytest.raises(ApiError) as info:
            tgi_call(GenerateRequest(inputs="x", parameters=parameters), stream, 8)
        assert info.value.param == "best_of" and status(info.value) == 422 and message in info.value.message


def test_tgi_best_of_answers_with_the_choice_of_the_highest_mean_logprob():
    body = GenerateRequest(inputs="x", parameters={"best_of": 2, "do_sample": True, "details": True})
    answer = response(body, two_choices(), 5)  # "Hello": -0.375 per token, "Yo": -1.0
    assert answer["generated_text"] == "Hello" and answer["details"]["seed"] == 5
    assert [t["text"] for t in answer["details"]["tokens"]] == ["Hel", "lo"]
    (other,) = answer["details"]["best_of_sequences"]
    assert (other["generated_text"], other["finish_reason"], other["generated_tokens"], other["seed"]) == \
        ("Yo", "eos_token", 1, 5)
    assert [t["text"] for t in other["tokens"]] == ["Yo"]
    plain = GenerateRequest(inputs="x", parameters={"best_of": 2, "do_sample": True})
    worse_first = dataclasses.replace(two_choices(), choices=tuple(reversed(two_choices().choices)))
    assert response(plain, worse_first, 5) == {"generated_text": "Hello"}
