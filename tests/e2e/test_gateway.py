"""The OpenAI- and TGI-compatible gateway in front of the real tritonserver, driven by the real
clients: the official `openai` SDK and `huggingface_hub.InferenceClient`.

The tiny demo's text is gibberish, so the tests compare with what the server (or the same engine)
answers for the same request, and check shapes, token counts, finish reasons and errors. The demo's
base tokenizer has no chat template: two copies of demo adapters get their own, one as
`chat_template.jinja`, one inside `tokenizer_config.json`.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import tritonclient.http
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from gateway_kit import post_json, running_gateway
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest
from multilora.launcher import free_port
from multilora.triton.messages import parse_messages
from multilora_client import Client

pytestmark = pytest.mark.e2e
BASE = "demo/base"  # lora_llm's base_model parameter, the gateway's default name for the base model
PLAIN = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "List the customers."}]
PROMPT = "List the names of all customers in Berlin."
GUIDE = {"inputs": "Write a SQL query to find all users over 30.",
         "parameters": {"max_new_tokens": 200, "adapter_id": "sql"}}


@pytest.fixture(scope="module")
def template_adapters(served_demo: Path, server) -> dict[str, str]:
    """adapter id -> its own chat template (the tiny tokenizer has none of these special tokens, so
    both render as plain text and neither adds a stop token)."""
    adapters = served_demo / "adapters"
    shutil.copytree(adapters / "sql", adapters / "tmpl-jinja", dirs_exist_ok=True)
    (adapters / "tmpl-jinja" / "chat_template.jinja").write_text(PLAIN)
    shutil.copytree(adapters / "chat", adapters / "tmpl-config", dirs_exist_ok=True)
    (adapters / "tmpl-config" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    deadline = time.monotonic() + 10  # the server's disk listing is a scan at most a few seconds old
    while not {"tmpl-jinja", "tmpl-config"} <= set(Client(server.grpc_url).adapters().disk):
        assert time.monotonic() < deadline, "the new adapters never appeared in the server's listing"
        time.sleep(0.2)
    return {"tmpl-jinja": PLAIN, "tmpl-config": CHATML}


@pytest.fixture(scope="module")
def gateway(server, template_adapters, tmp_path_factory) -> Iterator[str]:
    with running_gateway(server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


@pytest.fixture
def oai(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def engine_chat(engine, adapter_id: str, max_tokens: int, **params):
    request = GenerationRequest("ref", "", SamplingParams(max_tokens=max_tokens, **params), adapter_id,
                                messages=parse_messages(json.dumps(MESSAGES)))
    return engine.generate([request])["ref"][-1]


# -- OpenAI ---------------------------------------------------------------------------------------
def test_models_are_the_base_and_every_adapter(oai, server):
    models = oai.models.list().data
    listing = Client(server.grpc_url).adapters()
    assert [m.id for m in models] == [BASE] + sorted(set(listing.disk) | set(listing.host) | set(listing.device))
    assert {"sql", "chat", "acme/translate", "tmpl-jinja"} <= {m.id for m in models}
    assert models[0].parent is None and all(m.parent == BASE for m in models[1:])
    assert oai.models.retrieve("acme/translate").parent == BASE
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("acme/nope")


def test_chat_uses_each_adapters_own_template(oai, reference_engine, template_adapters):
    rendered = {a: reference_engine.chat_templates.render(parse_messages(json.dumps(MESSAGES)), a).text
                for a in template_adapters}
    assert rendered["tmpl-jinja"] != rendered["tmpl-config"]
    for adapter_id in template_adapters:
        answer = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=12)
        expected = engine_chat(reference_engine, adapter_id, 12)
        assert answer.choices[0].message.content == expected.text and expected.text
        assert answer.choices[0].message.role == "assistant" and answer.model == adapter_id
        assert answer.usage.prompt_tokens == expected.prompt_tokens == len(
            reference_engine.tokenizer.encode(rendered[adapter_id], add_special_tokens=False))
        assert answer.usage.completion_tokens == expected.completion_tokens
        assert answer.choices[0].finish_reason == {"length": "length", "eos": "stop"}[expected.finish_reason.value]


def test_streamed_chat_joins_to_the_whole_answer_with_usage_last(oai):
    whole = oai.chat.completions.create(model="tmpl-config", messages=MESSAGES, max_tokens=16)
    chunks = list(oai.chat.completions.create(model="tmpl-config", messages=MESSAGES, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_the_base_model_has_no_chat_template_here(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=4)
    assert info.value.body["param"] == "messages" and "the base model has no chat template" in info.value.message


def test_completions_equal_the_server_answering_directly(oai, server):
    direct = Client(server.grpc_url)
    for model, adapter_id in ((BASE, None), ("sql", "sql"), ("acme/translate", "acme/translate")):
        answer = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12)
        expected = direct.generate(PROMPT, adapter_id, max_tokens=12, exclude_input_in_output=True)
        assert answer.choices[0].text == expected.text
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected.prompt_tokens,
                                                                                expected.completion_tokens)
    sampled = [oai.completions.create(model="chat", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
               for _ in range(2)]
    expected = direct.generate(PROMPT, "chat", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                               exclude_input_in_output=True)
    assert sampled[0].choices[0].text == sampled[1].choices[0].text == expected.text
    streamed = oai.completions.create(model="sql", prompt=PROMPT, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == direct.generate(
        PROMPT, "sql", max_tokens=12, exclude_input_in_output=True).text


def test_unknown_model_and_bad_fields_get_openais_errors(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert "The model 'no-such-adapter' does not exist" in info.value.message
    for fields, param in (({"temperature": 5}, "temperature"), ({"n": 17}, "n"),
                          ({"extra_body": {"frobnicate": 1}}, "frobnicate")):
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model="sql", prompt=PROMPT, **fields)
        assert info.value.status_code == 400 and info.value.body["param"] == param


def test_chat_logprobs_are_the_engines(oai, reference_engine):
    vocabulary = reference_engine.vocabulary
    answer = oai.chat.completions.create(model="tmpl-jinja", messages=MESSAGES, max_tokens=8, logprobs=True,
                                         top_logprobs=3)
    expected = engine_chat(reference_engine, "tmpl-jinja", 8, logprobs=3).logprobs
    content = answer.choices[0].logprobs.content
    assert len(content) == len(expected) == answer.usage.completion_tokens
    for got, want in zip(content, expected):
        assert (got.token, bytes(got.bytes)) == (vocabulary[want.token_id].text, vocabulary[want.token_id].bytes)
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [a.token for a in got.top_logprobs] == [vocabulary[i].text for i, _ in want.top]
        assert [a.logprob for a in got.top_logprobs] == pytest.approx([v for _, v in want.top], abs=1e-4)
    streamed = oai.chat.completions.create(model="tmpl-jinja", messages=MESSAGES, max_tokens=8, logprobs=True,
                                           stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]


def test_n_choices_are_the_engines_through_triton_and_the_gateway(oai, gateway, server, reference_engine):
    """One request with n choices: the engine's choices, through lora_llm (one response holding all
    of them, [1, n] outputs, over gRPC and /generate) and the gateway (OpenAI's n, whole and
    streamed; TGI's best_of)."""
    sampled = dict(max_tokens=8, temperature=0.9, seed=11)
    expected = engine_chat(reference_engine, "tmpl-jinja", n=3, **sampled)
    texts = [c.text for c in expected.choices]
    assert len(set(texts)) == 3
    answer = oai.chat.completions.create(model="tmpl-jinja", messages=MESSAGES, n=3, **sampled)
    assert [(c.index, c.message.content) for c in answer.choices] == list(enumerate(texts))
    assert answer.usage.completion_tokens == sum(c.completion_tokens for c in expected.choices)
    streamed = {i: "" for i in range(3)}
    finished = {}
    for chunk in oai.chat.completions.create(model="tmpl-jinja", messages=MESSAGES, n=3, stream=True, **sampled):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert list(streamed.values()) == texts and finished == {c.index: c.finish_reason for c in answer.choices}

    direct = Client(server.grpc_url).generate(PROMPT, "sql", n=2, exclude_input_in_output=True, **sampled)
    reference = reference_engine.generate([GenerationRequest("ref", PROMPT, SamplingParams(n=2, **sampled), "sql")])
    assert [c.text for c in direct.choices] == [c.text for c in reference["ref"][-1].choices]
    parameters = {"adapter_id": "sql", "n": 2, "exclude_input_in_output": True, **sampled}
    status, body = post(f"{server.endpoints.url}/v2/models/lora_llm/generate", {"text_input": PROMPT,
                                                                              "parameters": parameters})
    generated = json.loads(body)
    assert status == 200 and generated["text_output"] == [c.text for c in direct.choices]
    assert generated["index"] == [0, 1]
    assert generated["completion_tokens"] == [c.completion_tokens for c in direct.choices]

    best = InferenceClient(base_url=gateway).text_generation(PROMPT, adapter_id="sql", max_new_tokens=8, best_of=2,
                                                              do_sample=True, temperature=0.9, seed=11, details=True)
    others = best.details.best_of_sequences
    assert len(others) == 1 and sorted([best.generated_text, others[0].generated_text]) == sorted(
        c.text for c in direct.choices)


# -- TGI ------------------------------------------------------------------------------------------
def test_tgi_details_list_each_tokens_id_text_and_logprob(gateway, reference_engine):
    tgi = InferenceClient(base_url=gateway)
    vocabulary = reference_engine.vocabulary
    expected = reference_engine.generate([GenerationRequest("ref", PROMPT, SamplingParams(
        max_tokens=8, logprobs=2, prompt_logprobs=0), "sql")])["ref"][-1]
    details = tgi.text_generation(PROMPT, max_new_tokens=8, adapter_id="sql", details=True, top_n_tokens=2,
                                  decoder_input_details=True).details
    assert [t.id for t in details.tokens] == [t.token_id for t in expected.logprobs]
    assert [t.text for t in details.tokens] == [vocabulary[t.token_id].text for t in expected.logprobs]
    assert [t.special for t in details.tokens] == [vocabulary[t.token_id].special for t in expected.logprobs]
    assert [t.logprob for t in details.tokens] == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-4)
    # huggingface_hub leaves top_tokens' inner lists as dicts
    assert [[t["id"] for t in top] for top in details.top_tokens] == [[i for i, _ in t.top] for t in expected.logprobs]
    assert [t.id for t in details.prefill] == [t.token_id for t in expected.prompt_logprobs]
    assert details.prefill[0].logprob is None
    assert [t.logprob for t in details.prefill[1:]] == pytest.approx(
        [t.logprob for t in expected.prompt_logprobs[1:]], abs=1e-4)
    events = list(tgi.text_generation(PROMPT, max_new_tokens=8, adapter_id="sql", stream=True, details=True))
    assert [e.token.id for e in events] == [t.id for t in details.tokens]
    assert [e.token.logprob for e in events] == [t.logprob for t in details.tokens]


def test_huggingface_hub_text_generation_with_an_adapter(gateway, server):
    tgi = InferenceClient(base_url=gateway)
    expected = Client(server.grpc_url).generate(PROMPT, "sql", max_tokens=12, exclude_input_in_output=True)
    assert tgi.text_generation(PROMPT, max_new_tokens=12, adapter_id="sql") == expected.text
    pieces = list(tgi.text_generation(PROMPT, max_new_tokens=12, adapter_id="sql", stream=True))
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    detailed = tgi.text_generation(PROMPT, max_new_tokens=12, adapter_id="sql", details=True, return_full_text=True)
    assert detailed.generated_text == PROMPT + expected.text
    assert detailed.details.generated_tokens == expected.completion_tokens
    assert detailed.details.finish_reason == {"length": "length", "eos": "eos_token"}[expected.finish_reason]
    events = list(tgi.text_generation(PROMPT, max_new_tokens=12, adapter_id="sql", stream=True, details=True))
    assert events[-1].generated_text == expected.text and events[-1].details.input_length == expected.prompt_tokens
    with pytest.raises(ValidationError, match="unknown adapter 'no-such-adapter'"):
        tgi.text_generation(PROMPT, max_new_tokens=4, adapter_id="no-such-adapter")


def post(url: str, payload: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_tgi_guides_payload_works_unchanged(gateway, server):
    expected = Client(server.grpc_url).generate(GUIDE["inputs"], "sql", max_tokens=200, exclude_input_in_output=True)
    status, body = post(f"{gateway}/generate", GUIDE)
    assert status == 200 and json.loads(body) == {"generated_text": expected.text}
    status, body = post(f"{gateway}/", GUIDE)
    assert status == 200 and json.loads(body) == [{"generated_text": expected.text}]
    status, body = post(f"{gateway}/generate_stream", GUIDE)
    events = [json.loads(line[len("data:"):]) for line in body.decode().splitlines() if line.startswith("data:")]
    assert status == 200 and "".join(e["token"]["text"] for e in events) == expected.text
    assert [e["generated_text"] for e in events] == [None] * (len(events) - 1) + [expected.text]
    status, body = post(f"{gateway}/generate", {"inputs": "x", "parameters": {"temperature": 0}})
    error = json.loads(body)
    assert status == 422 and error["error_type"] == "validation" and "temperature" in error["error"]


# -- structured output ----------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999},
                                           "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"], "additionalProperties": False}


def test_structured_output_through_openai_tgi_and_triton(oai, gateway, server):
    """The tiny model's text is random: every valid document here is the grammar's doing, through
    each API, for adapters and the base model in one server; bad schemas are 400s naming the problem."""
    json_schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    answers = [oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=128, temperature=1.0, seed=i,
                                           response_format=json_schema) for i, model in
               enumerate(("tmpl-jinja", "tmpl-config"))]
    answers += [oai.completions.create(model=model, prompt=PROMPT, max_tokens=128, temperature=1.0, seed=i,
                                       extra_body={"response_format": json_schema})
                for i, model in enumerate((BASE, "sql", "chat"))]
    texts = [a.choices[0].message.content if hasattr(a.choices[0], "message") else a.choices[0].text for a in answers]
    for answer, text in zip(answers, texts):
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    whole = oai.completions.create(model="summarize", prompt=PROMPT, max_tokens=96, temperature=1.0, seed=5,
                                   extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert whole.finish_reason == "length" or isinstance(json.loads(whole.text), dict)

    tgi = InferenceClient(base_url=gateway)
    generated = tgi.text_generation(PROMPT, max_new_tokens=128, adapter_id="sql", do_sample=True, seed=3,
                                    grammar={"type": "json", "value": SCHEMA}, details=True)
    assert generated.details.finish_reason == "eos_token"
    jsonschema.validate(json.loads(generated.generated_text), SCHEMA)
    pieces = list(tgi.text_generation(PROMPT, max_new_tokens=32, adapter_id="chat",
                                      grammar={"type": "regex", "value": "(yes|no), [0-9]{2}"}, stream=True))
    assert re.fullmatch("(yes|no), [0-9]{2}", "".join(pieces))

    # lora_llm directly: the client package over gRPC, and /generate's JSON parameter over HTTP
    direct = Client(server.grpc_url).generate(PROMPT, "summarize", max_tokens=128, temperature=1.0, seed=9,
                                              exclude_input_in_output=True, response_format=json_schema)
    assert direct.finish_reason == "eos"
    jsonschema.validate(json.loads(direct.text), SCHEMA)
    status, body = post(f"{server.url}/v2/models/lora_llm/generate", {
        "text_input": PROMPT, "parameters": {"max_tokens": 128, "exclude_input_in_output": True,
                                             "response_format": json.dumps(json_schema)}})
    assert status == 200, body
    jsonschema.validate(json.loads(json.loads(body)["text_output"]), SCHEMA)

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                          "maximum": 1}}}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tmpl-jinja", messages=MESSAGES, response_format=bad)
    assert info.value.body["param"] == "response_format"
    assert "cannot be compiled: Invalid range: minimum greater than maximum" in info.value.message
    with pytest.raises(ValidationError, match="uses 'not' at the top level"):
        tgi.text_generation(PROMPT, max_new_tokens=8, grammar={"type": "json", "value": {"not": {"type": "null"}}})


# -- the connection and the server ------------------------------------------------------------------
def adapter_metrics(server, adapter_id: str) -> tuple[int, int]:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    values = [int(float(m.group(1))) if m else 0 for m in (
        re.search(rf'^lora_{name}{{adapter="{adapter_id}"}} (\S+)$', text, re.M)
        for name in ("requests_total", "generated_tokens_total"))]
    return values[0], values[1]


def wait_for_requests(server, adapter_id: str, count: int) -> int:
    deadline = time.monotonic() + 10
    while (current := adapter_metrics(server, adapter_id))[0] < count:
        assert time.monotonic() < deadline, "the server never finished the request"
        time.sleep(0.05)
    return current[1]


def test_a_client_that_leaves_cancels_its_request(oai, gateway, server):
    long = {"model": "summarize", "prompt": PROMPT, "max_tokens": 1500, "extra_body": {"ignore_eos": True}}
    requests, tokens = adapter_metrics(server, "summarize")
    with oai.completions.create(stream=True, **long) as stream:
        for _ in zip(range(3), stream):
            pass  # then leave
    left = time.monotonic()
    streamed_tokens = wait_for_requests(server, "summarize", requests + 1) - tokens
    assert 0 < streamed_tokens < 1500 and time.monotonic() - left < 5

    connection = http.client.HTTPConnection("127.0.0.1", int(gateway.rsplit(":", 1)[1]), timeout=0.5)
    body = {k: v for k, v in long.items() if k != "extra_body"} | long["extra_body"]
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        connection.getresponse()  # a whole answer would take seconds: the client gives up first
    connection.close()
    assert 0 < wait_for_requests(server, "summarize", requests + 2) - tokens - streamed_tokens < 1500


def test_server_not_ready_is_503_and_a_timeout_is_504(server, tmp_path):
    with running_gateway(f"127.0.0.1:{free_port()}", tmp_path / "down.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="sql", prompt=PROMPT)
        assert info.value.status_code == 503 and info.value.code == "service_unavailable"
        assert post(f"{url}/generate", GUIDE)[0] == 503
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(f"{url}/health")
    with running_gateway(server.grpc_url, tmp_path / "slow.log", "--timeout", "0.05", "--base-model-name", "b") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=1000, extra_body={"ignore_eos": True})
        assert info.value.status_code == 504 and info.value.code == "timeout"
        assert urllib.request.urlopen(f"{url}/health").status == 200


def test_kserve_v2_http_reaches_lora_llm_through_the_gateway(server, tmp_path):
    """Issue 23 item 2: with Triton's HTTP on loopback, KServe v2 HTTP clients come through the
    gateway's /v2; the body that kills tritonserver 2.51 is refused there and never reaches it."""
    with running_gateway(server.grpc_url, tmp_path / "kserve.log", "--triton-http", server.url) as url:
        request = {"text_input": PROMPT,
                   "parameters": {"max_tokens": 6, "adapter_id": "sql", "exclude_input_in_output": True}}
        status, _, through = post_json(f"{url}/v2/models/lora_llm/generate", request)
        assert status == 200
        assert json.loads(through) == json.loads(post_json(f"{server.url}/v2/models/lora_llm/generate", request)[2])
        status, headers, events = post_json(f"{url}/v2/models/lora_llm/generate_stream",
                                            {**request, "parameters": {**request["parameters"], "stream": True}})
        pieces = [json.loads(line[6:]) for line in events.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert "".join(p["text_output"] for p in pieces) == json.loads(through)["text_output"]
        http = tritonclient.http.InferenceServerClient(url.removeprefix("http://"))
        assert http.is_server_ready() and http.is_model_ready("lora_llm")
        assert http.get_model_metadata("lora_llm")["name"] == "lora_llm"
        deep = b'{"text_input": ' + b"[" * 1_000_000 + b'"x"' + b"]" * 1_000_000 + b"}"
        status, _, body = post_json(f"{url}/v2/models/lora_llm/generate", deep)
        assert status == 400 and "nested more than 32 levels" in json.loads(body)["error"]
        status, _, body = post_json(f"{url}/v2/repository/index", {})
        assert status == 403
    assert server.process.poll() is None and server.is_ready(), "tritonserver 2.51 never saw the body"
