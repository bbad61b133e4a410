"""The real tritonserver serving lora_llm: outputs equal the in-process engine, errors are clear."""
from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

pytestmark = pytest.mark.e2e
PROMPT = "Translate to French: good morning"


def expected(engine, adapter: str | None, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    request = GenerationRequest("ref", prompt, SamplingParams(max_tokens=max_tokens), adapter)
    return engine.generate([request])["ref"][-1].text


def post(server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def generate(server, parameters: dict, prompt: str | None = PROMPT) -> tuple[int, dict]:
    request = {"parameters": parameters} | ({"text_input": prompt} if prompt is not None else {})
    status, body = post(server, "/v2/models/lora_llm/generate", request)
    return status, json.loads(body)


def grpc_stream(server, requests: list[dict]) -> list[tuple[list[str], str | None]]:
    """Send all requests on one gRPC stream at once; per request: the text pieces, or the error."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i, fields in enumerate(requests):
        inputs = []
        for name, value in fields.items():
            if isinstance(value, str):
                tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=np.object_))
            elif isinstance(value, bool):
                tensor = grpcclient.InferInput(name, [1, 1], "BOOL")
                tensor.set_data_from_numpy(np.array([[value]], dtype=bool))
            else:
                tensor = grpcclient.InferInput(name, [1, 1], "INT64")
                tensor.set_data_from_numpy(np.array([[value]], dtype=np.int64))
            inputs.append(tensor)
        client.async_stream_infer("lora_llm", inputs, request_id=str(i), enable_empty_final_response=True)
    pieces: dict[str, list[str]] = {str(i): [] for i in range(len(requests))}
    errors: dict[str, str | None] = {str(i): None for i in range(len(requests))}
    done = 0
    while done < len(requests):
        result, error = results.get(timeout=120)
        if error is not None:
            # Errors carry no request id in the stream callback; they arrive for our bad requests only.
            errors[f"error{done}"] = str(error)
            done += 1
            continue
        response = result.get_response()
        rid = response.id
        text = result.as_numpy("text_output")
        if text is not None:
            pieces[rid].append(text.reshape(-1)[0].decode())
        if response.parameters["triton_final_response"].bool_param:
            done += 1
    client.stop_stream()
    client.close()
    return [(pieces[str(i)], errors.get(str(i))) for i in range(len(requests))] + \
        [([], v) for k, v in errors.items() if k.startswith("error")]


def test_three_adapters_in_flight_at_once_over_grpc_streaming(server, reference_engine):
    adapters = ["sql", "chat", "acme/translate"]
    requests = [{"text_input": PROMPT, "adapter_id": a, "max_tokens": 12, "stream": True} for a in adapters]
    results = grpc_stream(server, requests)
    for adapter, (pieces, error) in zip(adapters, results):
        assert error is None
        assert len(pieces) > 1, "streaming must send more than one response"
        assert "".join(pieces) == expected(reference_engine, adapter)
    assert len({"".join(p) for p, _ in results[:3]}) == 3, "three adapters, three different answers"


def test_generate_with_adapter_id_parameter(server, reference_engine):
    status, body = generate(server, {"adapter_id": "summarize", "max_tokens": 12})
    assert status == 200, body
    assert body["text_output"] == PROMPT + expected(reference_engine, "summarize")  # as the vLLM backend
    status, body = generate(server, {"adapter_id": "summarize", "max_tokens": 12, "exclude_input_in_output": True})
    assert body["text_output"] == expected(reference_engine, "summarize")
    assert body["finish_reason"] in ("length", "eos")
    assert body["completion_tokens"] <= 12 and body["prompt_tokens"] > 0


def test_base_model_and_lora_name_in_sampling_parameters(server, reference_engine):
    status, body = generate(server, {"max_tokens": 12, "exclude_input_in_output": True})
    assert status == 200 and body["text_output"] == expected(reference_engine, None)
    status, body = generate(server, {"sampling_parameters": json.dumps({"lora_name": "chat", "max_tokens": 12}),
                                     "exclude_input_in_output": True})
    assert status == 200 and body["text_output"] == expected(reference_engine, "chat")


def test_generate_stream_sse_joins_to_the_full_text(server, reference_engine):
    status, body = post(server, "/v2/models/lora_llm/generate_stream",
                        {"text_input": PROMPT, "parameters": {"adapter_id": "chat", "max_tokens": 12, "stream": True}})
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == expected(reference_engine, "chat")
    assert events[-1]["finish_reason"] in ("length", "eos")


@pytest.mark.parametrize("parameters, status, needles", [
    ({"adapter_id": "nope"}, 400, ["unknown adapter 'nope'"]),
    ({"adapter_id": "mismatch"}, 400, ["mismatch", "layers.0.q_proj", "(8, 96)", "(8, 128)"]),
    ({"adapter_id": "truncated"}, 400, ["truncated", "adapter_model.safetensors"]),
    ({"adapter_id": "escape"}, 400, ["outside adapter_dir"]),
    ({"adapter_id": "badjson"}, 400, ["badjson", "adapter_config.json is not valid JSON"]),
    ({"adapter_id": "rank128"}, 400, ["rank128", "rank 128", "above max_lora_rank 64"]),
    ({"adapter_id": "embed"}, 400, ["embed", "embed_tokens", "not a LoRA A/B weight of a supported projection"]),
    ({"adapter_id": "../base"}, 400, ["adapter_id", "not a valid adapter id"]),
    ({"adapter_id": "/etc/passwd"}, 400, ["adapter_id", "not a valid adapter id"]),
    ({"max_tokens": -1}, 400, ["max_tokens", "[1, 1000000]"]),
    ({"top_p": 1.5}, 400, ["top_p", "(0, 1]"]),
    ({"sampling_parameters": json.dumps({"temperature": "hot"})}, 400, ["temperature", "a number"]),
    ({"sampling_parameters": "{not json"}, 400, ["sampling_parameters", "not valid JSON"]),
    ({"adapter_id": "sql", "max_tokens": 5000}, 400, ["max_model_len"]),
    ({"max_tokns": 3}, 400, ["max_tokns", "unknown parameter"]),
])
def test_errors_name_what_is_wrong(server, parameters, status, needles):
    got_status, body = generate(server, parameters)
    assert got_status == status, body
    for needle in needles:
        assert needle in body["error"]


def test_bad_requests_do_not_harm_good_ones_in_the_same_batch(server, reference_engine):
    bad = [{"adapter_id": "nope"}, {"adapter_id": "mismatch"}, {"adapter_id": "truncated"}, {"adapter_id": "badjson"},
           {"adapter_id": "rank128"}, {"adapter_id": "escape"}, {"max_tokens": -5}, {"top_p": 0}]
    good = {"adapter_id": "sql", "max_tokens": 12, "exclude_input_in_output": True}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, server, p) for p in bad + [good] + bad + [good]]
        results = [f.result() for f in futures]
    for (status, body), parameters in zip(results, bad + [good] + bad + [good]):
        if parameters is good:
            assert status == 200 and body["text_output"] == expected(reference_engine, "sql")
        else:
            assert status == 400 and body["error"]
