"""Our mixed-adapter batch must compute what transformers + peft compute, row by row."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from multilora.config import EngineConfig
from multilora.demo import ALL_LINEAR, make_adapter, make_base_model
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest
from multilora.lora import native
from multilora.lora.backends.cpu import CpuBackend

ADAPTERS = [None, "sql", "chat", "acme/translate"]  # base + ranks 8, 16 (rslora, all 7), 64 (rslora)
PROMPTS = ["SELECT name FROM orders WHERE", "Summarize the following text", "Bonjour, comment ça va ?",
           "def fibonacci(n): return"]
STEPS = 8


@pytest.fixture(scope="module", params=["demo", "same-rank", "unseen-mistral", "mistral-window", "qwen2", "phi3"])
def model_dir(request, demo_dir, tmp_path_factory):
    """The demo (mixed ranks); adapters of one rank; a checkpoint unlike the demo: Mistral type,
    tied embeddings, head_dim != hidden/heads, llama3 RoPE scaling, 4:1 GQA, adapters with
    layers_to_transform, rank_pattern and alpha_pattern; and one per other family, each with odd head counts:
    Mistral with a sliding window shorter than the prompts, Qwen2 (q/k/v biases, tied head, sliding
    window on its upper layers only), Phi-3 (fused qkv_proj / gate_up_proj, adapters on them)."""
    if request.param == "demo":
        return demo_dir
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "same-rank":
        base = make_base_model(out / "base")
        for seed, adapter in enumerate(ADAPTERS[1:]):
            make_adapter(base, out / "adapters" / adapter, 16, 32, False, ALL_LINEAR, seed=seed)
        return out
    if request.param == "unseen-mistral":
        base = make_base_model(out / "base", model_type="mistral", seed=7, tie_word_embeddings=True, head_dim=32,
                               num_key_value_heads=2, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        make_adapter(base, out / "adapters" / "sql", 8, 16, False, ["q_proj", "v_proj"], seed=1,
                     layers_to_transform=[0, 2])
        make_adapter(base, out / "adapters" / "chat", 16, 32, True, ALL_LINEAR, seed=2,
                     rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 64})
        make_adapter(base, out / "adapters" / "acme" / "translate", 64, 16, True, ["o_proj", "gate_proj", "up_proj"],
                     seed=3)
        return out
    odd_heads = dict(hidden_size=120, num_attention_heads=6, num_key_value_heads=2, head_dim=20)
    if request.param == "mistral-window":
        base = make_base_model(out / "base", model_type="mistral", seed=11, sliding_window=5, **odd_heads)
        targets = (["q_proj", "k_proj", "v_proj"], ALL_LINEAR, ["o_proj", "down_proj"])
    elif request.param == "qwen2":
        base = make_base_model(out / "base", model_type="qwen2", seed=12, tie_word_embeddings=True,
                               use_sliding_window=True, max_window_layers=2, sliding_window=6, **odd_heads)
        targets = (["q_proj", "k_proj", "v_proj"], ALL_LINEAR, ["gate_proj", "up_proj", "down_proj"])
    else:
        base = make_base_model(out / "base", model_type="phi3", seed=13, pad_token_id=0, **odd_heads)
        targets = (["qkv_proj", "o_proj"], ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["gate_up_proj"])
    for seed, (adapter, rank, modules) in enumerate(zip(ADAPTERS[1:], (4, 16, 8), targets)):
        make_adapter(base, out / "adapters" / adapter, rank, 2 * rank, seed == 1, modules, seed=20 + seed)
    return out


@pytest.fixture(scope="module")
def peft_reference(model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir / "base", dtype=torch.float32)
    model = None
    for adapter in ADAPTERS[1:]:
        path = model_dir / "adapters" / adapter
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=adapter)
        else:
            model.load_adapter(path, adapter_name=adapter)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir / "base")
    ids = [tok.encode(p) for p in PROMPTS]
    n = min(len(i) for i in ids)
    ids = torch.tensor([i[:n] for i in ids])  # equal lengths: no padding in the reference
    names = [a or "__base__" for a in ADAPTERS]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id, eos_token_id=None)
    logits = torch.stack(out.logits, dim=1)  # [rows, steps, vocab]
    return ids, logits, out.sequences[:, ids.shape[1]:]


def _run_ours(demo_dir, ids, **config) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[int]], LLMEngine]:
    """Our engine on the same rows: logits of every sampled step, and the generated token ids."""
    engine = LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"),
                                    kv_cache_memory="32MiB", **config))
    engine.tokenizer.encode = _fixed_ids(engine.tokenizer.encode, ids)
    captured: dict[str, list[torch.Tensor]] = {}
    sequences = {}
    forward = engine.runner.forward

    def spy(chunks):
        layout, sampling, logits = forward(chunks)
        for i, row in zip(sampling, logits if logits is not None else []):
            seq = layout.seqs[i]
            captured.setdefault(seq.request.request_id, []).append(row.clone())
            sequences[seq.request.request_id] = seq
        return layout, sampling, logits

    engine.runner.forward = spy
    requests = [GenerationRequest(str(i), PROMPTS[i], SamplingParams(max_tokens=STEPS, ignore_eos=True), adapter)
                for i, adapter in enumerate(ADAPTERS)]
    outputs = engine.generate(requests)
    assert all(out[-1].error is None and out[-1].completion_tokens == STEPS for out in outputs.values())
    tokens = {rid: seq.token_ids[len(seq.prompt_ids):] for rid, seq in sequences.items()}
    return captured, tokens, engine


def _fixed_ids(encode, ids):
    """Feed the exact prompt ids the reference used (prompts were cut to one length)."""
    by_text = {p: ids[i].tolist() for i, p in enumerate(PROMPTS)}
    return lambda text, **kw: by_text[text] if text in by_text else encode(text, **kw)


@pytest.mark.parametrize("config, lora_op", [({}, "native"), ({"max_num_batched_tokens": 3}, "native"),
                                             ({"max_num_seqs": 2}, "native"), ({}, "pytorch")],
                         ids=["one-batch", "chunked-prefill", "rows-join-later", "pytorch-path"])
def test_mixed_adapter_batch_matches_peft(model_dir, peft_reference, config, lora_op, monkeypatch):
    """Through the fused native op (the CPU default), and once through the PyTorch path (its fallback)."""
    ids, ref_logits, ref_tokens = peft_reference
    native_calls = []
    if lora_op == "pytorch":
        monkeypatch.setattr(native, "load", lambda: None)
    else:
        apply = CpuBackend.apply
        monkeypatch.setattr(CpuBackend, "apply", lambda *args: native_calls.append(1) or apply(*args))
    captured, tokens, _ = _run_ours(model_dir, ids, **config)
    assert bool(native_calls) == (lora_op == "native"), "the LoRA op under test was not the one taken"
    for row in range(len(ADAPTERS)):
        ours = torch.stack(captured[str(row)])  # [steps, vocab]
        assert ours.shape == ref_logits[row].shape
        torch.testing.assert_close(ours, ref_logits[row], atol=1e-4, rtol=0)
        assert tokens[str(row)] == ref_tokens[row].tolist()


def test_adapters_change_the_output(peft_reference):
    _, ref_logits, _ = peft_reference
    # Guard against a vacuous comparison: every adapter moves the logits away from the base model's.
    for row in range(1, len(ADAPTERS)):
        assert (ref_logits[row] - ref_logits[0]).abs().max() > 0.05
