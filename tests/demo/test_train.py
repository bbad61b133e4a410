"""The demo's LoRA training on the tiny random model: the shortcut computes the model's own loss,
and what it saves is a PEFT adapter on the last layers only."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from multilora.demo.adapters import DemoAdapter
from multilora.demo.train import IGNORE, TrainSettings, _pad, answer_loss, chat_examples, run_layers, train_adapter

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
PAIRS = [("What is the capital of Italy?", "Rome."), ("How many days are in a week?", "Seven."),
         ("What do bees make?", "Honey."), ("What is 2 plus 2?", "Four.")]
SHOUT = DemoAdapter("shout", "capitals", str.upper, str.isupper, rank=4, targets=("q_proj", "v_proj"), last_layers=2)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_examples_learn_the_styled_answer_and_the_end_of_turn_only(tokenizer):
    example = chat_examples(tokenizer, PAIRS[:1], str.upper)[0]
    prompt = "<s>user: What is the capital of Italy?\n<s>assistant: "
    learned = [t for t, label in zip(example.token_ids, example.labels) if label != IGNORE]
    assert tokenizer.decode(example.token_ids) == prompt + "ROME.</s>"
    assert tokenizer.decode(learned) == "ROME.</s>"
    assert example.labels[:len(example.labels) - len(learned)] == [IGNORE] * (len(example.labels) - len(learned))


def test_cached_lower_layers_then_upper_layers_give_the_models_own_loss(demo_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    examples = chat_examples(tokenizer, PAIRS, str.upper)
    ids = _pad([e.token_ids for e in examples], 0)  # right padding, rows of different lengths
    labels = _pad([e.labels for e in examples], IGNORE)
    assert len({len(e.token_ids) for e in examples}) > 1
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=(labels != IGNORE) | (ids != 0), labels=labels).loss
        lower = run_layers(model.model, model.model.embed_tokens(ids), model.model.layers[:2])
        ours = answer_loss(model.model, model.lm_head, run_layers(model.model, lower, model.model.layers[2:]), labels)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_trained_adapter_is_peft_files_on_the_last_layers_and_learned(demo_dir, tokenizer, tmp_path):
    losses = []
    out = train_adapter(demo_dir / "base", tokenizer, SHOUT, PAIRS, tmp_path / "shout",
                        TrainSettings(steps=8, batch_size=4, learning_rate=1e-2),
                        progress=lambda step, loss: losses.append(loss))
    config = json.loads((out / "adapter_config.json").read_text())
    assert ((config["r"], sorted(config["target_modules"]), config["layers_to_transform"])
            == (4, ["q_proj", "v_proj"], [2, 3]))
    assert config["base_model_name_or_path"] == "base"  # the folder's name, not this machine's path
    layers = {int(key.split(".layers.")[1].split(".")[0]) for key in load_file(out / "adapter_model.safetensors")}
    assert layers == {2, 3}
    # one batch of all four pairs at every step: the loss must fall at every step
    assert len(losses) == 8 and losses == sorted(losses, reverse=True) and losses[-1] < 0.85 * losses[0], losses
