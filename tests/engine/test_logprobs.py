"""Logprobs are the model's own: log_softmax of the same positions in transformers + PEFT, per row,
for the base and three adapters in one batch (issue 22's floor: 1e-4 in fp32), for the generated
tokens and the prompt's, with chunked prefill too; rows that did not ask get none."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine_kit import make_engine
from multilora.engine.logprobs import TokenLogprob
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest
from multilora.errors import InvalidParameterError

ADAPTERS = [None, "sql", "chat", "acme/translate"]
PROMPTS = ["SELECT name FROM orders WHERE", "Summarize the following text", "Bonjour, comment ça va ?",
           "def fibonacci(n): return"]
STEPS = 6
TOP = 5
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def peft_model(demo_dir):
    base = AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32)
    model = None
    for adapter in ADAPTERS[1:]:
        path = demo_dir / "adapters" / adapter
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=adapter)
        else:
            model.load_adapter(path, adapter_name=adapter)
    return model.eval()


def reference(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers + PEFT's fp32 logits at every position of `ids`: [len(ids), V]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), adapter_names=[adapter or "__base__"]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_position(found: TokenLogprob, expected: torch.Tensor, k: int) -> None:
    """One position: the token's logprob, and its k alternatives, against the reference row [V]."""
    assert abs(found.logprob - expected[found.token_id].item()) <= TOLERANCE
    assert len(found.top) == k
    ids = [i for i, _ in found.top]
    values = torch.tensor([v for _, v in found.top], dtype=torch.float32)
    torch.testing.assert_close(values, expected.topk(k).values, atol=TOLERANCE, rtol=0)  # the k largest, in order
    torch.testing.assert_close(values, expected[ids], atol=TOLERANCE, rtol=0)  # and they are these tokens'


def run(engine, requests: list[GenerationRequest]) -> dict:
    outputs = engine.generate(requests)
    assert all(out[-1].error is None for out in outputs.values())
    return outputs


@pytest.mark.parametrize("config", [{}, {"max_num_batched_tokens": 3}], ids=["one-batch", "chunked-prefill"])
def test_logprobs_of_mixed_adapters_in_one_batch_match_peft(demo_dir, peft_model, config):
    engine = make_engine(demo_dir, **config)
    requests = [GenerationRequest(str(i), PROMPTS[i], SamplingParams(max_tokens=STEPS, ignore_eos=True, logprobs=TOP,
                                                                     prompt_logprobs=TOP), adapter)
                for i, adapter in enumerate(ADAPTERS)]
    # Sampled, with every sampling parameter set: logprobs are still the raw distribution's.
    requests.append(GenerationRequest("sampled", PROMPTS[1], SamplingParams(
        max_tokens=STEPS, ignore_eos=True, temperature=0.8, top_k=3, top_p=0.9, repetition_penalty=1.3, seed=5,
        logprobs=2), "chat"))
    requests.append(GenerationRequest("plain", PROMPTS[0], SamplingParams(max_tokens=STEPS, ignore_eos=True), "sql"))
    outputs = run(engine, requests)

    for request in requests[:-1]:
        (final,) = outputs[request.request_id]
        prompt_ids = engine.tokenizer.encode(request.prompt)
        generated = [found.token_id for found in final.logprobs]
        assert len(generated) == final.completion_tokens == STEPS
        expected = reference(peft_model, request.adapter_id, prompt_ids + generated)
        for step, found in enumerate(final.logprobs):
            position = expected[len(prompt_ids) - 1 + step]
            assert_position(found, position, request.params.logprobs)
            if request.params.temperature == 0:
                assert found.token_id == position.argmax().item()  # greedy: the reference's own choice
        if request.params.prompt_logprobs is None:
            assert final.prompt_logprobs is None
            continue
        assert [found.token_id for found in final.prompt_logprobs] == prompt_ids
        assert final.prompt_logprobs[0] == TokenLogprob(prompt_ids[0], None)  # nothing predicts the first token
        for p, found in enumerate(final.prompt_logprobs[1:], start=1):
            assert_position(found, expected[p - 1], TOP)

    plain = outputs["plain"][-1]
    assert plain.logprobs is None and plain.prompt_logprobs is None
    alone = run(make_engine(demo_dir), [GenerationRequest("plain", PROMPTS[0], SamplingParams(
        max_tokens=STEPS, ignore_eos=True), "sql")])["plain"][-1]
    assert plain.text == alone.text  # the rows that asked changed nothing for the one that did not


def test_streamed_logprobs_join_to_the_whole_and_the_prompts_come_first(demo_dir):
    engine = make_engine(demo_dir)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    outputs = run(engine, [GenerationRequest("whole", PROMPTS[2], params, "chat"),
                           GenerationRequest("stream", PROMPTS[2], params, "chat", stream=True)])
    (whole,), pieces = outputs["whole"], outputs["stream"]
    assert len(pieces) > 2
    assert [found for out in pieces for found in out.logprobs] == whole.logprobs
    assert pieces[0].prompt_logprobs == whole.prompt_logprobs and all(p.prompt_logprobs is None for p in pieces[1:])
    assert all(found.top == () for found in whole.prompt_logprobs)  # 0: the token's own logprob only
    assert all(len(found.top) == 1 for found in whole.logprobs)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_logprobs_out_of_range_are_refused_by_name(field, value):
    with pytest.raises(InvalidParameterError, match=rf"invalid '{field}': must be an integer in \[0, 20\]"):
        SamplingParams(**{field: value})
