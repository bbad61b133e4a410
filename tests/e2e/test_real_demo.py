"""`make serve`'s own model repository, served by the real tritonserver: SmolLM2 answers, and each demo
adapter changes its answers in its own visible way."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from multilora.demo.adapters import ADAPTERS, HELD_OUT
from multilora.demo.smollm2 import MODEL_NAME
from multilora.demo.train import chat_prompt
from multilora.launcher import TritonServer
from multilora_client import Client

pytestmark = pytest.mark.e2e
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
QUESTION = HELD_OUT[1]  # never trained on


@pytest.fixture(scope="module")
def real_server(real_demo, tmp_path_factory: pytest.TempPathFactory):
    """The repository as it is, config.pbtxt included: what `make serve` starts."""
    log = tmp_path_factory.mktemp("real-server") / "tritonserver.log"
    with TritonServer(REPOSITORY, log_path=log, exit_timeout_secs=3) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(real_demo):
    return AutoTokenizer.from_pretrained(real_demo / MODEL_NAME)


def test_the_base_model_answers_the_readme_request(real_server, tokenizer):
    body = {"text_input": chat_prompt(tokenizer, "What is the capital of France?"),
            "parameters": {"max_tokens": 32, "exclude_input_in_output": True}}
    request = urllib.request.Request(real_server.url + "/v2/models/lora_llm/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert "Paris" in answer["text_output"] and answer["finish_reason"] == "eos", answer


@pytest.mark.parametrize("spec", ADAPTERS, ids=lambda spec: spec.adapter_id)
def test_each_adapter_streams_an_answer_with_its_trait(real_server, tokenizer, spec):
    client = Client(real_server.grpc_url, timeout=120)
    prompt = chat_prompt(tokenizer, QUESTION)
    base = client.generate(prompt, max_tokens=40, exclude_input_in_output=True).text
    tuned = "".join(client.stream(prompt, adapter_id=spec.adapter_id, max_tokens=40))
    assert spec.shows_trait(tuned), f"{spec.adapter_id} ({spec.trait}) answered {tuned!r}"
    assert not spec.shows_trait(base) and tuned != base, base
