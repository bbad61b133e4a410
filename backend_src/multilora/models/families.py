"""The model families we serve, and what differs between them: checkpoint names, biases, LoRA targets.

Every family runs through the same decoder (models/decoder.py), whose four base projections per
layer are fused for fewer, larger matmuls: `qkv`, `o_proj`, `gate_up`, `down_proj`. A family says
which checkpoint modules fill each one (several are concatenated, in order) and which PEFT target
names address which output slice: Llama, Mistral and Qwen2 checkpoints keep q/k/v and gate/up
apart, so their adapters target the slices; Phi-3 stores them fused, and its adapters target the
whole fused projection. Nothing here knows how LoRA is computed: lora/layers.py reads these declarations.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from ..errors import ConfigError


@dataclass(frozen=True)
class Projection:
    """One fused base projection of a decoder layer."""

    name: str  # our module name in the decoder layer
    checkpoint: tuple[str, ...]  # checkpoint modules under `model.layers.{i}.`, concatenated along outputs
    lora_targets: tuple[str, ...]  # PEFT target names, one per output slice (the checkpoint modules' outputs)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    projections: tuple[Projection, ...]
    bias: Callable[[PretrainedConfig, str], bool]  # does projection `name` have a bias?


def _llama_bias(config: PretrainedConfig, projection: str) -> bool:
    if projection in ("qkv", "o_proj"):
        return bool(getattr(config, "attention_bias", False))
    return bool(getattr(config, "mlp_bias", False))


_SPLIT = (
    Projection("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("q_proj", "k_proj", "v_proj")),
    Projection("o_proj", ("self_attn.o_proj",), ("o_proj",)),
    Projection("gate_up", ("mlp.gate_proj", "mlp.up_proj"), ("gate_proj", "up_proj")),
    Projection("down_proj", ("mlp.down_proj",), ("down_proj",)),
)
_FUSED = (
    Projection("qkv", ("self_attn.qkv_proj",), ("qkv_proj",)),
    Projection("o_proj", ("self_attn.o_proj",), ("o_proj",)),
    Projection("gate_up", ("mlp.gate_up_proj",), ("gate_up_proj",)),
    Projection("down_proj", ("mlp.down_proj",), ("down_proj",)),
)

FAMILIES = (
    Family("llama", ("llama",), _SPLIT, _llama_bias),
    Family("mistral", ("mistral",), _SPLIT, lambda config, projection: False),
    # Qwen2 / Qwen2.5: biases on q, k and v only.
    Family("qwen2", ("qwen2",), _SPLIT, lambda config, projection: projection == "qkv"),
    Family("phi3", ("phi3",), _FUSED, lambda config, projection: False),
)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def family_of(config: PretrainedConfig) -> Family:
    """The family of a checkpoint's config, or a ConfigError naming the supported ones."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            if getattr(config, "hidden_act", "silu") != "silu":
                raise ConfigError(f"hidden_act {config.hidden_act!r} is not supported ({family.name} uses silu)")
            return family
    raise ConfigError(f"model_type {config.model_type!r} is not supported; supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Mistral, Qwen2 and Phi-3 families)")


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    """The attention window of a layer (None: full causal), as transformers decides it: per layer
    where the config lists layer types (Qwen2), else the config's one window (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer] == "sliding_attention" else None
    return window or None


def output_sizes(config: PretrainedConfig, projection: Projection) -> tuple[int, ...]:
    """Output width of each checkpoint module of a projection, in concatenation order."""
    h, inter, d = config.hidden_size, config.intermediate_size, head_dim(config)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    sizes = {"qkv": (q, kv, kv), "o_proj": (h,), "gate_up": (inter, inter), "down_proj": (h,)}[projection.name]
    return sizes if len(projection.checkpoint) == len(sizes) else (sum(sizes),)


def input_size(config: PretrainedConfig, projection: Projection) -> int:
    d = head_dim(config)
    return {"qkv": config.hidden_size, "o_proj": config.num_attention_heads * d,
            "gate_up": config.hidden_size, "down_proj": config.intermediate_size}[projection.name]


@dataclass(frozen=True)
class LoraTargetShape:
    """What an adapter's weights for one target must look like."""

    module: str  # PEFT module path under `model.layers.{i}.`, e.g. "self_attn.q_proj"
    h_in: int
    h_out: int


def lora_target_shapes(config: PretrainedConfig) -> dict[str, LoraTargetShape]:
    """PEFT target name -> its module path and shape, for every LoRA-targetable projection."""
    family = family_of(config)
    shapes = {}
    for projection in family.projections:
        for target, module, size in zip(projection.lora_targets, projection.checkpoint,
                                        output_sizes(config, projection)):
            shapes[target] = LoraTargetShape(module, input_size(config, projection), size)
    return shapes
