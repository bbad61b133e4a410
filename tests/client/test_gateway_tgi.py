"""TGI requests in lora_llm's terms and lora_llm's answers in TGI's shapes (no server)."""
from __future__ import annotations

import json

import pytest

from multilora_client.gateway.errors import ApiError
from multilora_client.gateway.tgi_api import GenerateRequest, error_body, response, status, stream_events, triton_call
from multilora_client.response import Chunk, Generation

GUIDE = {"inputs": "Write a SQL query to find all users over 30.", "parameters": {"max_new_tokens": 200,
                                                                                  "adapter_id": "sql"}}


def request(**parameters) -> GenerateRequest:
    return GenerateRequest(inputs="Hello", parameters=parameters)


def test_the_guides_payload_is_a_greedy_adapter_request():
    call, seed = triton_call(GenerateRequest(**GUIDE), stream=False, default_max_tokens=16)
    assert (call.prompt, call.adapter_id, call.stream, seed) == (GUIDE["inputs"], "sql", False, None)
    assert call.sampling == {"max_tokens": 200}


def test_sampling_as_tgi_decides_it():
    assert "temperature" not in triton_call(request(temperature=1.0, seed=5), True, 16)[0].sampling  # greedy
    sampled, seed = triton_call(request(do_sample=True, seed=5), True, 16)
    assert sampled.sampling == {"max_tokens": 16, "temperature": 1.0, "seed": 5} and seed == 5
    for parameters in ({"temperature": 0.5}, {"top_k": 10}, {"top_p": 0.9}):
        call, seed = triton_call(request(**parameters), True, 16)
        assert call.sampling["temperature"] == parameters.get("temperature", 1.0)
        assert isinstance(seed, int) and call.sampling["seed"] == seed  # chosen here, so details can report it
    call, _ = triton_call(request(repetition_penalty=1.2, stop=["\n"], max_new_tokens=3), True, 16)
    assert call.sampling == {"max_tokens": 3, "repetition_penalty": 1.2, "stop": ["\n"]}


def test_huggingface_hubs_unset_parameters_are_accepted_and_unsupported_ones_named():
    nulls = dict.fromkeys(["best_of", "decoder_input_details", "frequency_penalty", "grammar", "top_n_tokens",
                           "truncate", "typical_p", "watermark"])
    assert triton_call(request(**nulls), False, 16)[0].sampling == {"max_tokens": 16}
    assert triton_call(request(watermark=False, best_of=1), False, 16)[0].sampling == {"max_tokens": 16}
    for name, value in (("best_of", 2), ("typical_p", 0.5), ("grammar", {"type": "lark", "value": "x"}),
                        ("grammar", {"type": "json", "value": "{not json"})):
        with pytest.raises(ApiError) as info:
            triton_call(request(**{name: value}), False, 16)
        assert info.value.param == name and status(info.value) == 422
    with pytest.raises(ApiError) as info:  # as TGI: the prompt's details only come with a whole answer
        triton_call(request(decoder_input_details=True), True, 16)
    assert info.value.param == "decoder_input_details" and status(info.value) == 422


def test_grammar_is_lora_llms_response_format():
    schema = {"type": "object", "properties": {"sql": {"type": "string"}}}
    for value in (schema, '{"type": "object", "properties": {"sql": {"type": "string"}}}'):  # an object or its text
        call, _ = triton_call(request(grammar={"type": "json", "value": value}), False, 16)
        assert call.sampling == {"max_tokens": 16,
                                 "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    call, _ = triton_call(request(grammar={"type": "regex", "value": "[0-9]+"}), True, 16)
    assert call.sampling["response_format"] == {"type": "regex", "value": "[0-9]+"}
    sent = {name: array for name, _, array in call.tensors()}["response_format"]
    assert json.loads(sent[0, 0]) == {"type": "regex", "value": "[0-9]+"}


def test_generate_response_with_and_without_details():
    generation = Generation(" SELECT", "eos", 9, 2)
    assert response(request(), generation, None) == {"generated_text": " SELECT"}
    full = response(request(details=True, return_full_text=True), generation, 7)
    assert full == {"generated_text": "Hello SELECT", "details": {"finish_reason": "eos_token", "generated_tokens": 2,
                                                                  "seed": 7, "prefill": [], "tokens": []}}


def test_stream_events_carry_the_text_at_the_end():
    body = request(details=True)
    (piece,) = stream_events(body, Chunk(" SEL", False), 0, " SEL", None)
    assert piece == {"index": 0, "token": {"id": 0, "text": " SEL", "logprob": None, "special": False},
                     "generated_text": None, "details": None}
    (last,) = stream_events(body, Chunk("ECT", True, "stop", 4, 2), 1, " SELECT", None)
    assert last["token"]["text"] == "ECT" and last["generated_text"] == " SELECT"
    assert last["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 2, "input_length": 4, "seed": None}
    assert stream_events(request(), Chunk("", True, "length", 4, 2), 2, "x", None)[0]["details"] is None
    assert stream_events(request(), Chunk("", False), 3, "x", None) == []  # an empty piece is no event


@pytest.mark.parametrize("status_in, status_out, error_type", [
    (400, 422, "validation"), (404, 404, "validation"), (500, 424, "generation"), (503, 503, "unhealthy"),
    (504, 504, "timeout"),
])
def test_errors_in_tgis_shape_and_statuses(status_in, status_out, error_type):
    error = ApiError(status_in, "what went wrong")
    assert status(error) == status_out
    assert error_body(error) == {"error": "what went wrong", "error_type": error_type}
