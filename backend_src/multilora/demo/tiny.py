"""A random Llama-family checkpoint and PEFT adapters, for the fast tests and the benchmarks.

The files are in the real Hugging Face / PEFT formats (config.json, model.safetensors, a byte-level
BPE tokenizer trained here; adapters saved by `peft` itself), so the serving code loads them exactly
as it loads a real checkpoint. Weights are random but seeded: same files every run; the text they
produce is gibberish (the real demo model is `smollm2.py`'s).

    python -m multilora.demo OUT_DIR --preset tiny|100m [--adapters N]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .peft_files import save_adapter

CORPUS = """\
Multi-LoRA serving loads one base model once and serves many fine-tunes of it from one process.
SELECT name, count(*) FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY 2 DESC;
Summarize the following text in one sentence. The quick brown fox jumps over the lazy dog.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Translate to French: good morning, how are you? Bonjour, comment ça va ? Très bien, merci.
Ünïcödé text streams safely: naïve café, 日本語のテキスト, 中文字符, emoji 🚀🔥✨ and math ∑∫√π.
Triton Inference Server speaks KServe v2 over HTTP and gRPC; requests may stream tokens back.
"""


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int


PRESETS = {
    "tiny": Preset(128, 344, 4, 8, 4, 1024),  # fast tests and `make serve`
    "100m": Preset(768, 2048, 12, 12, 4, 8192),  # the benchmarks' ~100M-parameter model
}

# (id, rank, alpha, rslora, target modules): ranks 4..64, attention-only to all seven projections.
DEMO_ADAPTERS = [
    ("sql", 8, 16, False, ["q_proj", "v_proj"]),
    ("chat", 16, 32, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("summarize", 4, 8, False, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("acme/translate", 64, 16, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
]
ALL_LINEAR = DEMO_ADAPTERS[1][4]


def train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=2048).save_pretrained(out)


def make_base_model(out: Path, preset: str = "tiny", seed: int = 0, model_type: str = "llama",
                    **overrides) -> Path:
    """A random Llama-family checkpoint in Hugging Face layout; returns its folder.

    `overrides` go into the model config (e.g. tie_word_embeddings, rope_theta, rope_scaling).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, p.vocab_size)
    settings = dict(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, max_position_embeddings=2048, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.05,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out


def make_adapter(base_dir: Path, out: Path, rank: int, alpha: float, use_rslora: bool, targets: list[str],
                 seed: int, **lora_options) -> Path:
    """A PEFT LoRA adapter for `base_dir`, saved by peft, with non-zero (random) A and B.

    `lora_options` go into peft's LoraConfig (layers_to_transform, alpha_pattern, rank_pattern, ...).
    """
    return make_adapters(base_dir, [out], rank, alpha, use_rslora, targets, seed, **lora_options)[0]


def make_adapters(base_dir: Path, outs: list[Path], rank: int, alpha: float, use_rslora: bool,
                  targets: list[str], seed: int, **lora_options) -> list[Path]:
    """Several adapters of one shape, each with its own random weights (seed + index).

    One peft model is built and re-randomised per adapter: loading the base once keeps a thousand
    benchmark adapters cheap to make.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets,
                        init_lora_weights=False, task_type="CAUSAL_LM", **lora_options)
    model = get_peft_model(base, config)
    lora_params = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    for i, out in enumerate(outs):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, param in lora_params:
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(param, a=5 ** 0.5)
                else:  # peft's own init of B is zero or tiny; make each adapter's effect clearly visible
                    param.normal_(0.0, 0.5 / param.shape[1] ** 0.5)
        save_adapter(model, out, base_dir.name)
    return outs


def make_demo(out: Path, preset: str = "tiny", extra_adapters: int = 0) -> None:
    base = make_base_model(out / "base", preset)
    for i, (adapter_id, rank, alpha, rslora, targets) in enumerate(DEMO_ADAPTERS):
        make_adapter(base, out / "adapters" / adapter_id, rank, alpha, rslora, targets, seed=100 + i)
    if extra_adapters:
        make_adapters(base, [out / "adapters" / f"gen-{i:04d}" for i in range(extra_adapters)], 16, 32, False,
                      ALL_LINEAR, seed=1000)
    (out / "READY").write_text("demo model and adapters are complete\n")

