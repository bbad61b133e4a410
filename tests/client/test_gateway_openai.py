"""OpenAI requests in lora_llm's terms and lora_llm's answers in OpenAI's shapes (no server)."""
from __future__ import annotations

import pytest

from multilora_client.gateway.errors import ApiError
from multilora_client.gateway.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    error_body,
    model_list,
    triton_call,
)
from multilora_client.response import Chunk, Generation

HI = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="sql", messages=HI, **fields)


def test_chat_request_fields_by_lora_llm_names():
    call = triton_call(chat(max_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop="END", top_k=4,
                            repetition_penalty=1.1, ignore_eos=True, stream=True), "sql", 256)
    assert call.messages == HI and call.prompt is None and call.adapter_id == "sql" and call.stream
    assert call.sampling == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["END"],
                             "top_k": 4, "repetition_penalty": 1.1, "ignore_eos": True}


def test_max_completion_tokens_wins_and_the_gateway_default_fills_in():
    assert triton_call(chat(max_tokens=5, max_completion_tokens=7), "sql", 256).sampling == {"max_tokens": 7}
    assert triton_call(chat(), None, 256).sampling == {"max_tokens": 256}  # temperature left to the server: greedy


def test_completion_takes_one_prompt():
    call = triton_call(CompletionRequest(model="base", prompt=["SELECT"], stop=["a", "b"]), None, 16)
    assert (call.prompt, call.messages, call.adapter_id, call.sampling["stop"]) == ("SELECT", None, None, ["a", "b"])
    for prompt in (["a", "b"], [""], []):
        with pytest.raises(ApiError) as info:
            triton_call(CompletionRequest(model="base", prompt=prompt), None, 16)
        assert (info.value.status, info.value.param) == (400, "prompt")


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 0.5, "'presence_penalty' = 0.5 is not supported"),
    ("top_logprobs", 3, "'top_logprobs' needs 'logprobs': true"),
    ("tools", [{"type": "function"}], "'tools'"),
    ("frobnicate", 1, "Unrecognized request argument supplied: frobnicate"),
])
def test_fields_lora_llm_cannot_honour_are_refused_by_name(field, value, message):
    with pytest.raises(ApiError) as info:
        triton_call(chat(**{field: value}), "sql", 16)
    assert info.value.status == 400 and info.value.param == field and message in info.value.message


def test_defaults_and_bookkeeping_fields_are_accepted():
    call = triton_call(chat(n=1, logprobs=False, presence_penalty=0, user="u", tools=None,
                            response_format={"type": "text"}, metadata={"a": "b"}), "sql", 16)
    assert call.sampling == {"max_tokens": 16}


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                            "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}},
])
def test_response_format_goes_to_lora_llm_as_it_is(response_format):
    """lora_llm checks it and names what is wrong (a 400 with param response_format)."""
    assert triton_call(chat(response_format=response_format), "sql", 16).sampling == {
        "max_tokens": 16, "response_format": response_format}
    completion = CompletionRequest(model="base", prompt="JSON:", response_format=response_format)
    assert triton_call(completion, None, 16).sampling["response_format"] == response_format


def test_whole_chat_answer_in_openai_shape():
    body = chat()
    answer = Reply(body, "chatcmpl").whole(Generation("Hello!", "eos", 7, 3))
    assert answer["object"] == "chat.completion" and answer["model"] == "sql" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                  "logprobs": None, "finish_reason": "stop"}]
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_whole_completion_answer_with_echo():
    body = CompletionRequest(model="sql", prompt="SELECT", echo=True)
    answer = Reply(body, "cmpl").whole(Generation(" 1", "length", 2, 1))
    assert answer["object"] == "text_completion"
    assert answer["choices"][0] == {"index": 0, "text": "SELECT 1", "logprobs": None, "finish_reason": "length"}


def test_chat_stream_chunks_open_with_the_role_and_end_with_finish_reason_and_usage():
    reply = Reply(chat(stream=True, stream_options={"include_usage": True}), "chatcmpl")
    events = (reply.chunks(Chunk("He", False), first=True)
              + reply.chunks(Chunk("llo", True, "length", 7, 2), first=False))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "He"}, {"content": "llo"}, {}]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]] == [None, None, None, "length"]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == reply.id for e in events)
    assert [e["usage"] for e in events[:-1]] == [None] * 4
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 9


def test_completion_stream_without_usage_has_no_usage_key():
    reply = Reply(CompletionRequest(model="sql", prompt="x", stream=True), "cmpl")
    events = reply.chunks(Chunk("", True, "eos", 1, 1), first=True)
    assert [e["choices"][0]["text"] for e in events] == [""]
    assert events[0]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[0]


def test_models_list_names_the_base_as_parent():
    listing = model_list("base", ["acme/translate", "sql"], 123)
    assert [(m["id"], m["parent"]) for m in listing["data"]] == [("base", None), ("acme/translate", "base"),
                                                                ("sql", "base")]
    assert all(m["object"] == "model" and m["created"] == 123 for m in listing["data"])


def test_error_shape():
    assert error_body(ApiError(404, "The model 'x' does not exist", "model", "model_not_found")) == {
        "error": {"message": "The model 'x' does not exist", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}}
    assert error_body(ApiError(503, "down"))["error"]["type"] == "server_error"
