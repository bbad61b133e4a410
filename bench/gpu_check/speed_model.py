"""The engine speed stages' model, written straight from tensors drawn on the device.

A random Llama checkpoint (config.json, model.safetensors, a tokenizer) and PEFT LoRA adapters on
all seven projections, in the files the engine reads. Unlike multilora.demo's builders (a model
built by transformers in fp32 on the CPU, initialised, saved, and loaded again by peft for the
adapters), every weight here is drawn once, in its final dtype, on the device: the names and shapes
come from the model built on the meta device (no memory, no init). For the 8-layer Llama-3-8B shape
(2.0B parameters) that is 4 GB of bf16 written instead of 8 GB of fp32 written and read twice.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BASE_SETTINGS = dict(max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=False)


def _meta_model(config):
    """The model of `config` on the meta device: its parameters' names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _drawn(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
           std: float) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


def write_base(out: Path, settings: dict, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random checkpoint of the Llama shape `settings` (hidden_size, num_hidden_layers, ...) in
    `out`. Matrices ~ N(0, 1/fan_in) (activations keep their scale through the layers), norms 1."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from multilora.demo.tiny import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", **(BASE_SETTINGS | settings))
    model = _meta_model(config)
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, meta in model.state_dict().items():
        if meta.dim() == 1:
            weight = torch.ones(meta.shape, dtype=dtype)
        else:
            weight = _drawn(meta.shape, dtype, torch.device(device), gen, meta.shape[-1] ** -0.5).cpu()
        tensors[name] = weight
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    train_tokenizer(out, config.vocab_size)
    return out


def write_adapters(base: Path, outs: list[Path], rank: int, alpha: float, targets: list[str], device: str,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[Path]:
    """PEFT LoRA adapters for `base` on `targets` of every layer: A like peft's kaiming-uniform
    init, B ~ N(0, 0.25 / rank) (a clearly visible effect), each adapter its own draw."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    model = _meta_model(AutoConfig.from_pretrained(base))
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "init_lora_weights": False, "base_model_name_or_path": base.name}
    gen = torch.Generator(device).manual_seed(seed)
    dev = torch.device(device)
    for out in outs:
        tensors = {}
        for name, linear in linears:
            bound = linear.in_features ** -0.5
            a = torch.empty(rank, linear.in_features, dtype=dtype, device=dev).uniform_(-bound, bound, generator=gen)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = _drawn(
                (linear.out_features, rank), dtype, dev, gen, 0.5 / rank**0.5).cpu()
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return outs
