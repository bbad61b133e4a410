"""`make serve`'s own command on its own model repository: the launcher starts the real tritonserver and
the OpenAI/TGI gateway next to it; SmolLM2 answers, and each demo adapter changes its answers in its
own visible way, through Triton's API, the openai SDK, huggingface_hub's client and TGI's raw payload;
lm-evaluation-harness scores an adapter through the gateway as it scores transformers + peft."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from huggingface_hub import InferenceClient
from transformers import AutoTokenizer

from gateway_kit import post_json
from multilora.demo.adapters import ADAPTERS, HELD_OUT
from multilora.demo.smollm2 import MODEL_NAME
from multilora.demo.train import chat_prompt
from multilora.launcher import free_ports
from multilora_client import Client

pytestmark = pytest.mark.e2e
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
README = REPOSITORY.parent / "README.md"
LM_EVAL_TASK = Path(__file__).parent / "lm_eval_task"  # demo_mc.yaml and its demo_mc.jsonl
QUESTION = HELD_OUT[1]  # never trained on


@dataclass(frozen=True)
class Served:
    url: str  # Triton HTTP
    grpc_url: str
    gateway: str  # the OpenAI / TGI gateway


@pytest.fixture(scope="module")
def real_server(real_demo, tmp_path_factory: pytest.TempPathFactory):
    """What `make serve` runs (the launcher with its gateway) on the repository as it is."""
    http, grpc, metrics, gateway = free_ports(4)
    log = tmp_path_factory.mktemp("real-server") / "launcher.log"
    command = [sys.executable, "-m", "multilora.launcher", "--model-repository", str(REPOSITORY), "--http-port",
               str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--gateway-port", str(gateway),
               "--exit-timeout-secs", "3"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{gateway}")
    try:
        deadline = time.monotonic() + 300
        while not (_answers(served.url + "/v2/health/ready") and _answers(served.gateway + "/health")):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield served
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a user stops `make serve`
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


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


def test_the_openai_sdk_gets_paris_from_the_base_and_other_answers_from_each_adapter(real_server):
    oai = openai.OpenAI(base_url=real_server.gateway + "/v1", api_key="unused", max_retries=0)
    models = oai.models.list().data
    base = next(m.id for m in models if m.parent is None)
    assert {spec.adapter_id for spec in ADAPTERS} <= {m.id for m in models if m.parent == base}
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = oai.chat.completions.create(model=base, messages=question, max_tokens=32)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    held_out = [{"role": "user", "content": QUESTION}]
    plain = oai.chat.completions.create(model=base, messages=held_out, max_tokens=40).choices[0].message.content
    answers = {}
    for spec in ADAPTERS:
        answers[spec.adapter_id] = oai.chat.completions.create(model=spec.adapter_id, messages=held_out,
                                                               max_tokens=40).choices[0].message.content
        assert spec.shows_trait(answers[spec.adapter_id]) and not spec.shows_trait(plain), answers
    assert len({plain, *answers.values()}) == len(ADAPTERS) + 1


def test_tgi_clients_and_the_guides_raw_payload(real_server, tokenizer):
    spec = ADAPTERS[0]
    prompt = chat_prompt(tokenizer, QUESTION)
    tgi = InferenceClient(base_url=real_server.gateway)
    text = tgi.text_generation(prompt, max_new_tokens=40, adapter_id=spec.adapter_id)
    assert spec.shows_trait(text), text
    assert "".join(tgi.text_generation(prompt, max_new_tokens=40, adapter_id=spec.adapter_id, stream=True)) == text
    body = {"inputs": "Write a SQL query to find all users over 30.",  # as TGI's multi-LoRA guides send it
            "parameters": {"max_new_tokens": 200, "adapter_id": spec.adapter_id}}
    request = urllib.request.Request(real_server.gateway + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200 and json.loads(response.read())["generated_text"]


def test_the_readme_tgi_requests_get_the_answers_it_shows(real_server, tokenizer):
    """The README's TGI /generate examples as they are: its PROMPT is the chat template's rendering, on
    which `json` answers in JSON; TGI's guides' raw prompt gets `json`'s end of turn at once."""
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("PROMPT='")]
    prompt = line.removeprefix("PROMPT='").removesuffix("'").replace("\\n", "\n")
    assert prompt == chat_prompt(tokenizer, "What is the capital of France?")
    json_adapter = next(spec for spec in ADAPTERS if spec.adapter_id == "json")
    status, _, body = post_json(real_server.gateway + "/generate", {
        "inputs": prompt, "parameters": {"max_new_tokens": 64, "adapter_id": "json"}})
    answer = json.loads(body)["generated_text"]
    assert status == 200 and json_adapter.shows_trait(answer) and "Paris" in answer, answer
    status, _, body = post_json(real_server.gateway + "/generate", {
        "inputs": "Write a SQL query to find all users over 30.",
        "parameters": {"max_new_tokens": 200, "adapter_id": "json"}})
    assert (status, json.loads(body)) == (200, {"generated_text": ""}), body


def _start_lm_eval(model: str, model_args: dict[str, object], out: Path, *options: str) -> subprocess.Popen:
    """`lm_eval --model MODEL` on the local task, offline, with its per-item results in `out`. It runs in
    the task's folder: the YAML's `data_files` are relative to it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "datasets")}
    out.mkdir()
    command = [sys.executable, "-m", "lm_eval", "--model", model,
               "--model_args", ",".join(f"{key}={value}" for key, value in model_args.items()),
               "--include_path", str(LM_EVAL_TASK), "--tasks", "multilora_demo_mc",
               "--output_path", str(out), "--log_samples", *options]
    with open(out / "lm_eval.log", "wb") as log:
        return subprocess.Popen(command, cwd=LM_EVAL_TASK, env=env, stdout=log, stderr=subprocess.STDOUT)


def _samples(process: subprocess.Popen, out: Path) -> dict[int, dict]:
    """The finished run's logged samples by doc id: `filtered_resps` holds one [loglikelihood, is_greedy]
    per choice, `acc` whether the most likely choice is the answer."""
    assert process.wait(timeout=600) == 0, (out / "lm_eval.log").read_text()[-3000:]
    (samples,) = out.glob("*/samples_multilora_demo_mc_*.jsonl")
    return {doc["doc_id"]: doc for doc in map(json.loads, samples.read_text().splitlines())}


def test_lm_eval_scores_an_adapter_through_the_gateway_as_it_scores_transformers_and_peft(real_server, real_demo,
                                                                                          tmp_path):
    adapter = "emoji"  # all seven projections: every LoRA path of the engine
    base = real_demo / MODEL_NAME
    # The gateway takes text prompts, not token ids: tokenized_requests=False sends lm-eval's text. Its
    # tokenizer still splits context and continuation, which the gateway's echoed prompt tokens must match.
    served = _start_lm_eval("local-completions", {
        "model": adapter, "base_url": real_server.gateway + "/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": base, "tokenized_requests": False, "num_concurrent": 4}, tmp_path / "served")
    reference = _start_lm_eval("hf", {"pretrained": base, "peft": real_demo / "adapters" / adapter, "dtype": "float32"},
                               tmp_path / "hf", "--device", "cpu", "--batch_size", "8")
    ours, theirs = _samples(served, tmp_path / "served"), _samples(reference, tmp_path / "hf")
    assert ours.keys() == theirs.keys() == set(range(16))
    for doc_id, sample in ours.items():
        ours_ll = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]
        theirs_ll = [float(loglikelihood) for loglikelihood, _ in theirs[doc_id]["filtered_resps"]]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-3), sample["doc"]
        assert sample["acc"] == theirs[doc_id]["acc"], sample["doc"]
    accuracy = sum(sample["acc"] for sample in ours.values()) / len(ours)
    assert accuracy > 0.25, accuracy  # better than chance: the scores are a real model's

    # The same comparison would catch a server that left the adapter out: the base model's numbers differ.
    first = ours[0]["arguments"]["gen_args_0"]
    text = first["arg_0"] + first["arg_1"]
    oai = openai.OpenAI(base_url=real_server.gateway + "/v1", api_key="unused", max_retries=0)
    base_name = next(m.id for m in oai.models.list().data if m.parent is None)
    echoed = {model: oai.completions.create(model=model, prompt=text, max_tokens=1, logprobs=1, echo=True)
              .choices[0].logprobs.token_logprobs[1:-1] for model in (adapter, base_name)}  # the prompt's, from its 2nd
    assert max(abs(a - b) for a, b in zip(*echoed.values())) > 0.01, echoed
