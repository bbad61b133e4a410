"""Rotary position embeddings: cos/sin tables by position, and their application (full or partial).

The frequencies come from transformers' own RoPE functions (default, linear, dynamic, yarn,
llama3, longrope), so every RoPE variant a supported checkpoint declares means what it means there.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .families import head_dim


def inverse_frequencies(config: PretrainedConfig, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2], attention scaling) for the config's RoPE.

    longrope (Phi-3) switches to its long factors once a sequence outgrows
    `original_max_position_embeddings`; transformers decides that per forward pass. We serve
    sequences up to `max_positions`, so we take the long factors exactly when that limit is above
    the original length (the default for Phi-3's 4k models is the short set, as in transformers).
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    kwargs = {}
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        if max_positions > original:
            kwargs["seq_len"] = original + 1
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return inv_freq.float(), scaling


class Rotary(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, max_positions)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, rotary_dim]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        # sin with the first half negated: rotate() multiplies it with the halves swapped, which is
        # rotate_half(x) * sin with one op fewer (negation is exact, so the results are the same bits).
        sin = emb.sin() * scaling
        half = sin.shape[-1] // 2
        self.register_buffer("sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of a step's positions, [T, 1, rotary_dim]: looked up once per step, used
        by every layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, heads, d]; rotate-half layout as in Hugging Face checkpoints, on the first rotary_dim
    channels (all of them unless the config has a partial_rotary_factor). Computes transformers'
    x * cos + rotate_half(x) * sin, as x * cos + swap_halves(x) * signed sin."""
    cos, sin = rope
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((rotate(x[..., :rotary_dim], rope), x[..., rotary_dim:]), dim=-1)
    t, heads, _ = x.shape
    swapped = x.view(t, heads, 2, rotary_dim // 2).flip(2).view(t, heads, rotary_dim)  # a new tensor
    return (x * cos).add_(swapped.mul_(sin))
