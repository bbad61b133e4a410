"""Find a Hugging Face checkpoint (local folder or Hub id) and load it into our decoder.

Weights go straight from each safetensors shard into the model's parameters, converted to the
target dtype one tensor at a time on the way: the model is allocated once, on its device and in
its dtype, so loading never holds an fp32 copy of the whole model (an 8B model in bf16 peaks near
its 16 GB, not the ~48 GB of an fp32 detour).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from ..errors import ConfigError
from ..hub_ids import is_hub_id
from .cpu_linear import can_pack, pack_linears
from .decoder import DecoderModel
from .families import output_sizes
from .rotary import Rotary

HUB_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


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
               max_positions: int) -> DecoderModel:
    """Build our decoder on `device` in `dtype` and fill it from the checkpoint, shard by shard."""
    with torch.device("meta"):
        model = DecoderModel(config, max_positions).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty re-materialises the head apart from the embedding
    model.rotary = Rotary(config, max_positions).to(device)  # fp32 tables, not in the checkpoint
    targets = _parameter_targets(model, config)
    filled: set[str] = set()
    with torch.inference_mode():
        for shard in _shards(model_dir):
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():
                    if name in targets:
                        _copy_into(targets[name], handle.get_tensor(name), name, model_dir)
                        filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConfigError(f"checkpoint {model_dir} has no tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                          f"is it a {model.family.name}-family checkpoint?")
    model.eval()
    if can_pack(dtype, device):
        for layer in model.layers:
            pack_linears(layer, [p.name for p in model.family.projections])
        # A tied head shares the embedding: reordering would copy it, so it keeps the plain layout.
        pack_linears(model, ["lm_head"], reorder=not config.tie_word_embeddings)
    return model


def _parameter_targets(model: DecoderModel, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the parameter (or row slice of a fused one) it fills."""
    targets = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        targets[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
        targets[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for projection in model.family.projections:
            linear = getattr(layer, projection.name)
            offset = 0
            for module, size in zip(projection.checkpoint, output_sizes(config, projection)):
                targets[f"{prefix}{module}.weight"] = linear.weight[offset:offset + size]
                if linear.bias is not None:
                    targets[f"{prefix}{module}.bias"] = linear.bias[offset:offset + size]
                offset += size
    return targets


def _copy_into(target: torch.Tensor, tensor: torch.Tensor, name: str, model_dir: Path) -> None:
    if tensor.shape != target.shape:
        raise ConfigError(f"checkpoint {model_dir}: tensor {name!r} is {tuple(tensor.shape)}, "
                          f"the config implies {tuple(target.shape)}")
    target.copy_(tensor.to(target.dtype))


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise ConfigError(f"no *.safetensors weights in {model_dir}")
    return [model_dir / f for f in files]
