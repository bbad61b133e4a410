"""Find a Hugging Face checkpoint (local folder or Hub id) and load it into our LlamaModel."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from ..errors import ConfigError
from ..lora.adapter_ids import is_hub_id
from .cpu_linear import can_pack, pack_linears
from .llama import LlamaModel

HUB_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def resolve_model_dir(base_model: str, allow_hub_download: bool) -> Path:
    """A local folder as is; a Hub id through huggingface_hub's cache (honours HF_HUB_OFFLINE)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(base_model):
        raise ConfigError(f"parameter 'base_model': folder {base_model!r} does not exist")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = base_model.partition("@")
    try:
        # local_files_only still serves a cached snapshot when downloads are not allowed.
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_MODEL_FILES,
                                      local_files_only=not allow_hub_download))
    except Exception as exc:  # huggingface_hub raises several unrelated types here
        hint = "" if allow_hub_download else " (set parameter 'allow_hub_download' to 'true' to fetch it)"
        raise ConfigError(f"parameter 'base_model': cannot get Hub model {base_model!r}: {exc}{hint}") from exc


def load_config(model_dir: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir)


def load_model(model_dir: Path, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, num_lora_slots: int) -> LlamaModel:
    """Build our model and fill it from the checkpoint's safetensors (single file or sharded)."""
    with torch.device("meta"):
        model = LlamaModel(config, max_positions, num_lora_slots)
    model.to_empty(device=device)
    model.rotary = model.rotary.__class__(config, max_positions).to(device)  # buffers are not in the file
    tensors = _open_tensors(model_dir)
    state: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"checkpoint {model_dir} has no tensor {name!r}; is it a Llama-family model?")
        return tensors[name]()

    state["embed_tokens.weight"] = take("model.embed_tokens.weight")
    state["norm.weight"] = take("model.norm.weight")
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for suffix in ("weight", "bias"):
            names = [f"{src}self_attn.{p}.{suffix}" for p in ("q_proj", "k_proj", "v_proj")]
            if names[0] in tensors:
                state[f"{dst}qkv.{suffix}"] = torch.cat([take(n) for n in names])
            if f"{src}self_attn.o_proj.{suffix}" in tensors:
                state[f"{dst}o_proj.{suffix}"] = take(f"{src}self_attn.o_proj.{suffix}")
            names = [f"{src}mlp.{p}.{suffix}" for p in ("gate_proj", "up_proj")]
            if names[0] in tensors:
                state[f"{dst}gate_up.{suffix}"] = torch.cat([take(n) for n in names])
            if f"{src}mlp.down_proj.{suffix}" in tensors:
                state[f"{dst}down_proj.{suffix}"] = take(f"{src}mlp.down_proj.{suffix}")
        state[f"{dst}input_layernorm.weight"] = take(f"{src}input_layernorm.weight")
        state[f"{dst}post_attention_layernorm.weight"] = take(f"{src}post_attention_layernorm.weight")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    model.tie_weights()
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {model_dir} does not fit the model: missing {missing}, unexpected {unexpected}")
    model = model.to(dtype=dtype).eval()
    if can_pack(dtype, device):
        for layer in model.layers:
            pack_linears(layer, ["qkv", "o_proj", "gate_up", "down_proj"])
        if not config.tie_word_embeddings:  # a tied head shares the embedding: packing would copy it
            pack_linears(model, ["lm_head"])
    return model


def _open_tensors(model_dir: Path) -> dict[str, callable]:
    """Name -> loader for every tensor in the checkpoint, without reading them all at once."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise ConfigError(f"no *.safetensors weights in {model_dir}")
    loaders: dict[str, callable] = {}
    for file in files:
        handle = safe_open(model_dir / file, framework="pt")
        for name in handle.keys():
            loaders[name] = (lambda h=handle, n=name: h.get_tensor(n))
    return loaders
